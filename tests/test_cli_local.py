"""``edgecloud edge --force-local`` as a user runs it: a real process, text or one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cli.cluster import child_env, cli_command

pytestmark = pytest.mark.integration  # every test here starts real processes


REQUIRED = {"text", "token_ids", "mode", "split", "n_layers", "cloud_round_trips", "bytes_sent",
            "bytes_received", "tokens_from_mini", "retries", "ttft_ms", "ms_per_token", "timings"}


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=child_env(), timeout=timeout)


def test_json_output_is_one_object_with_the_contract_and_matches_generate(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    out = run("edge", "--force-local", "--model", "tiny-gpt2", "--prompt", "hello there", "--tokens", "12", "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert REQUIRED <= set(r)
    assert set(r["timings"]) == {"edge_compute_ms", "cloud_compute_ms", "transport_ms", "waiting_ms"}
    assert r["mode"] == "local" and r["split"] == r["n_layers"] == 4
    tokenizer = tiny_gpt2.load_tokenizer()
    ids = tokenizer("hello there")["input_ids"]  # no chat template on the tiny models
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2.directory).eval()
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert r["token_ids"] == expected
    assert r["text"] == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.real_model
def test_smollm2_local_cli_matches_generate_with_the_chat_template(smollm2, smollm2_hf):
    from partition.tokens import encode_prompt

    prompt = "Give me a synonym for quick."
    out = run("edge", "--force-local", "--prompt", prompt, "--tokens", "20", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    tokenizer = smollm2.load_tokenizer()
    ids = encode_prompt(tokenizer, prompt)
    assert r["prompt_tokens"] == len(ids)
    ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert r["token_ids"] == ref
    raw = json.loads(run("edge", "--force-local", "--prompt", prompt, "--tokens", "3", "--json",
                         "--raw-prompt").stdout)
    assert raw["prompt_tokens"] == len(tokenizer(prompt)["input_ids"]) < len(ids)


def test_a_prompt_past_the_context_is_refused_in_one_line_or_cut_on_request():
    prompt = " ".join(["word"] * 1100)  # past tiny-llama's 1024 positions
    out = run("edge", "--force-local", "--model", "tiny-llama", "--raw-prompt", "--prompt", prompt, "--tokens", "4")
    assert out.returncode == 2 and "holds 1024" in out.stderr and "--truncate-prompt" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("edge", "--force-local", "--model", "tiny-llama", "--raw-prompt", "--prompt", prompt, "--tokens", "4",
              "--truncate-prompt", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["prompt_tokens"] == 1020 and r["prompt_tokens_dropped"] > 0 and len(r["token_ids"]) == 4


def test_text_mode_streams_the_text_to_stdout_and_the_summary_to_stderr():
    out = run("edge", "--force-local", "--model", "tiny-llama", "--prompt", "abc", "--tokens", "5")
    assert out.returncode == 0, out.stderr
    assert "[local, split 4/4: 5 tokens" in out.stderr
    assert out.stdout.strip() != ""


@pytest.mark.parametrize("args, message", [
    (("--model", "/no/such/file.gguf"), "does not exist"),
    (("--model", "tiny-llama", "--split", "9"), "outside [0, 4]"),
    (("--model", "tiny-llama", "--force-local", "--force-cloud"), "exclude each other"),
    (("--model", "tiny-llama", "--force-local", "--tokens", "0"), "at least 1"),
    (("--model", "tiny-llama", "--force-local", "--top-p", "0"), "top_p"),
    (("--model", "tiny-llama", "--split", "2", "--mini", "lookup", "--mini-adapter", "a.pt"), "is for --mini self"),
    (("--model", "tiny-llama", "--split", "2", "--mini", "self", "--mini-adapter", "/no/such/adapter.pt"),
     "no drafter adapter at /no/such/adapter.pt"),
    (("--model", "tiny-llama", "--split", "2", "--deadline", "0"), "--deadline must be > 0"),
    (("--model", "tiny-llama", "--split", "2", "--timeout", "-1"), "--timeout must be > 0"),
])
def test_bad_input_gets_one_line_and_exit_code_2(args, message):
    out = run("edge", *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("split", [("--split", "2"), ()], ids=["fixed", "planned"])
def test_no_broker_gives_a_clear_error_within_the_deadline(split):
    """Without the fallback, a cloud that does not answer is an error whether the split was given
    or left to the planner (which would otherwise run every layer here)."""
    import time

    t0 = time.monotonic()
    out = run("edge", "--model", "tiny-llama", *split, "--tokens", "2", "--no-encryption",
              "--broker", "tcp://127.0.0.1:9", "--timeout", "1", "--deadline", "3", "--no-fallback", timeout=60)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "no answer from the broker" in out.stderr
    assert "Traceback" not in out.stderr
    # The 3 s deadline, not the default 60 s: what it adds is the process's start-up, which took
    # up to 24 s on a loaded two-core machine (torch and transformers imported from cold).
    assert time.monotonic() - t0 < 45


def test_with_json_an_error_is_the_one_object_on_stdout():
    out = run("edge", "--model", "tiny-llama", "--split", "9", "--json")
    assert out.returncode == 2
    assert json.loads(out.stdout) == {"error": {"type": "InvalidSplitError", "exit_code": 2,
                                                "message": "split 9 is outside [0, 4] for this model"}}
    assert "error: split 9" in out.stderr


def test_a_keys_directory_that_is_not_there_is_named():
    for args in (("edge", "--model", "tiny-llama", "--split", "2", "--tokens", "2"), ("status",)):
        out = run(*args, "--keys", "/no/such/keys", "--broker", "tcp://127.0.0.1:9", timeout=60)
        assert out.returncode == 1, out.stderr[-2000:]
        assert "the keys directory /no/such/keys does not exist" in out.stderr
        assert "Traceback" not in out.stderr


def test_keys_generate_where_no_directory_can_be_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for where, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "keys", "cannot be created")):
        out = run("keys", "generate", str(where), timeout=60)
        assert out.returncode == 1 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_without_a_cloud_the_edge_falls_back_to_local_with_the_same_output():
    local = json.loads(run("edge", "--model", "tiny-llama", "--force-local", "--tokens", "8", "--json").stdout)
    out = run("edge", "--model", "tiny-llama", "--split", "2", "--tokens", "8", "--no-encryption", "--json",
              "--broker", "tcp://127.0.0.1:9", "--timeout", "1", "--deadline", "2", timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["token_ids"] == local["token_ids"]
    assert r["fallback_at_step"] == 0


def test_a_worker_asked_for_cuda_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = run("cloud-worker", "--model", "tiny-llama", "--device", "cuda", "--no-encryption",
              "--broker", "tcp://127.0.0.1:9", timeout=60)
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr


def test_status_loads_no_torch_and_answers_a_dead_broker_in_one_line():
    """`edgecloud status` needs zmq and the key files only: it never waits for torch to import."""
    code = ("import sys\nfrom cli.main import app\n"
            "try:\n    app(['status', '--broker', 'tcp://127.0.0.1:9', '--timeout', '0.5'])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60)
    assert out.stdout.split() == ["False", "False", "1"], out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no answer from the broker at tcp://127.0.0.1:9" in errors[0]



@pytest.mark.parametrize("args, message", [
    (("edge", "--model", "/no/such/dir"), "no such model directory or file"),
    (("edge", "--model", "not a model!"), "nor a Hugging Face hub id"),
    (("edge", "--broker", "foo"), "is not a ZeroMQ endpoint"),
    (("edge", "--wire-dtype", "fp8"), "wire dtype must be one of"),
    (("edge", "--min-p", "3"), "min_p must be in [0, 1]"),
    (("edge", "--mini-mode", "guess"), "mini mode must be one of"),
    (("edge", "--force-local", "--force-cloud"), "exclude each other"),
    (("edge", "--split", "99"), "split 99 is outside [0, 30]"),
    (("edge", "--model", "tiny-llama", "--split", "5"), "split 5 is outside [0, 4]"),
    (("cloud-worker", "--broker", "foo"), "is not a ZeroMQ endpoint"),
    (("cloud-worker", "--model", "./not/here"), "no such model directory or file"),
    (("cloud-worker", "--model", "tiny-llama", "--device", "tpu"), "--device must be auto, cpu or cuda"),
    (("cloud-worker", "--model", "tiny-llama", "--dtype", "fp8"), "--dtype must be one of"),
    (("status", "--broker", "foo"), "is not a ZeroMQ endpoint"),
])
def test_bad_options_are_refused_before_torch_is_imported(args, message):
    """A mistake in the options is one line, without waiting for torch (seconds on a small device)."""
    code = ("import sys\nfrom cli.main import app\n"
            f"try:\n    app({list(args)!r})\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60)
    assert out.stdout.split() == ["False", "False", "2"], out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], out.stderr


@pytest.mark.real_model
def test_a_worker_interrupted_while_it_loads_ends_at_once(smollm2):
    """A worker stops on SIGTERM while it still loads and measures its model (seconds for
    SmolLM2, a minute for a first conversion) instead of finishing that first."""
    import signal
    import time

    proc = subprocess.Popen(cli_command("cloud-worker", "--model", "smollm2-135m", "--no-encryption", "--broker",
                                        "tcp://127.0.0.1:9"), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:  # until the worker says it is loading (or it exits)
            seen.append(line)
            if "loading smollm2-135m" in line:
                break
        assert proc.poll() is None and "loading" in seen[-1], "".join(seen)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "ready" not in "".join(seen) + err, err[-2000:]
    assert took < 2 + 3, f"took {took:.1f} s"


def test_a_process_started_after_torch_pinned_its_parent_gets_every_cpu_back():
    """OMP_PROC_BIND pins the thread that runs torch's first parallel region, and children
    inherit the pin: a worker started by a demo that had run torch got one core of two."""
    parent = (
        "import os, subprocess, sys\n"
        # Every CPU this machine lets us have (this test's own process may already be pinned).
        "try:\n"
        "    os.sched_setaffinity(0, range(os.cpu_count()))\n"
        "except OSError:\n"
        "    pass\n"
        "print(sorted(os.sched_getaffinity(0)))\n"
        "import cli\n"
        "from cli.cluster import child_env\n"
        "import torch\n"
        "torch.ones(300, 300) @ torch.ones(300, 300)\n"
        # What OMP_PROC_BIND does at torch's first parallel region, made certain on any machine.
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "child = 'import os, cli; print(sorted(os.sched_getaffinity(0)))'\n"
        "print(subprocess.run([sys.executable, '-c', child], env=child_env(), capture_output=True, text=True,"
        " check=True).stdout.strip())\n"
    )
    env = child_env()
    env.pop("EDGECLOUD_CPUS", None)  # this test's parent is the first edgecloud process
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    given, child = (json.loads(line) for line in out.stdout.strip().splitlines())
    if len(given) < 2:
        pytest.skip("this machine gives a process one CPU")
    assert child == given
