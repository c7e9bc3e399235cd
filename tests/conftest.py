import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests use tiny tensors, which gain nothing from intra-op threads; on a busy 2-core machine
    (DDP workers, a second pytest) two threads each can make a test ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
