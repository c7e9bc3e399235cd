"""Moving models between slmforge and other formats: weight-name tables (`names`) and, on them, writers."""
