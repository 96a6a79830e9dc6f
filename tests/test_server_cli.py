"""chat_openai.py on a stranger's first try: bad paths and ports fail at once with one `error:` line."""

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from gguf import GGUFReader, GGUFValueType, GGUFWriter

import ktransformers.models.loader as loader
from ktransformers.server.app import create_app
from ktransformers.server.engine import Engine
from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import ScriptedGenerator
from ktransformers.server.wsgi import BackgroundServer, bind_sockets

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("chat_openai", REPO / "chat_openai.py")
chat_openai = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_openai)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the (slow) model load is ever reached."""
    def load_model(*args, **kwargs):
        raise AssertionError("load_model was called: the check should have failed first")
    monkeypatch.setattr(loader, "load_model", load_model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_without_tokenizer(src: Path, dst: Path) -> Path:
    """The GGUF rewritten by the gguf package without its tokenizer.* metadata."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_shape=tensor.data.shape,
                          raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def run_main(argv, capsys):
    code = chat_openai.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bad_inputs(tiny_model_dir, tmp_path_factory):
    """name -> (arguments, words the message must contain)."""
    root = tmp_path_factory.mktemp("bad")
    gguf = tiny_model_dir / "model.gguf"
    (root / "empty").mkdir()
    truncated = root / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[: gguf.stat().st_size * 2 // 3])
    no_tokenizer_dir = root / "hf_without_tokenizer"
    no_tokenizer_dir.mkdir()
    (no_tokenizer_dir / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    bare = copy_without_tokenizer(gguf, root / "bare.gguf")
    return {
        "missing file": (["--gguf_path", str(root / "nope.gguf")], [str(root / "nope.gguf"), "no such file"]),
        "directory without GGUF": (["--gguf_path", str(root / "empty")], [str(root / "empty"), "no .gguf file"]),
        "truncated GGUF": (["--gguf_path", str(truncated)], [str(truncated), "truncated file"]),
        "model_path without tokenizer": (["--gguf_path", str(gguf), "--model_path", str(no_tokenizer_dir)],
                                         [str(no_tokenizer_dir), "no tokenizer.json"]),
        "missing model_path": (["--gguf_path", str(gguf), "--model_path", str(root / "nowhere")],
                               [str(root / "nowhere"), "no such directory"]),
        "GGUF without tokenizer": (["--gguf_path", str(bare)], [str(bare), "holds no tokenizer", "--model_path"]),
    }


@pytest.mark.parametrize("case", ["missing file", "directory without GGUF", "truncated GGUF",
                                  "model_path without tokenizer", "missing model_path", "GGUF without tokenizer"])
def test_bad_model_files_give_one_error_line_before_loading(case, bad_inputs, no_model_load, capsys):
    args, words = bad_inputs[case]
    code, out, err = run_main(args + ["--port", str(free_port())], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err


def test_the_script_exits_2_without_a_traceback(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "chat_openai.py"), "--gguf_path", str(tmp_path / "x.gguf"),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"error: --gguf_path {tmp_path / 'x.gguf'}: no such file\n"
    assert time.monotonic() - started < 60


def test_a_loader_error_is_one_line_and_a_bug_keeps_its_traceback(tiny_model_dir, monkeypatch, capsys):
    args = ["--gguf_path", str(tiny_model_dir / "model.gguf"), "--port", str(free_port())]

    def bad_options(*a, **k):   # what the loader raises for input only it can judge
        raise ValueError("rules.yaml: rule 3 names no backend")
    monkeypatch.setattr(loader, "load_model", bad_options)
    code, _, err = run_main(args, capsys)
    assert (code, err) == (2, "error: rules.yaml: rule 3 names no backend\n")

    def bug(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(loader, "load_model", bug)
    with pytest.raises(RuntimeError, match="a bug"):   # not swallowed: Python prints its traceback
        chat_openai.main(args)


@pytest.mark.parametrize("port, reason", [("0", "1..65535"), ("65536", "1..65535"), ("99999", "1..65535"),
                                          ("http", "port number")])
def test_port_is_range_checked(port, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_openai.parse_args(["--gguf_path", "x.gguf", "--port", port])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --port" in err and reason in err
    assert chat_openai.parse_args(["--gguf_path", "x", "--port", "65535"]).port == 65535


@pytest.mark.parametrize("option", ["--max_new_tokens", "--max_context", "--cpu_infer", "--queue_size"])
def test_counts_must_be_positive_before_loading(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_openai.parse_args(["--gguf_path", "x.gguf", option, "0"])
    assert exit_info.value.code == 2 and f"error: {option} must be >= 1, got 0" in capsys.readouterr().err


def test_busy_port_fails_at_once_before_any_file_is_read(tmp_path, no_model_load, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("model files were checked: the port must be checked first")
    monkeypatch.setattr(chat_openai, "check_model_files", never)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        code, out, err = run_main(["--gguf_path", str(tmp_path / "m.gguf"), "--port", str(port)], capsys)
    assert time.monotonic() - started < 1.0
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use")


def test_reserved_port_refuses_until_served_then_serves_there():
    port = free_port()
    sockets = bind_sockets("127.0.0.1", port)
    try:
        with pytest.raises(ConnectionRefusedError):   # bound, not listening: clients are not left hanging
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        engine = Engine(ScriptedGenerator())
        with BackgroundServer(create_app(engine, ServerSettings()), sockets=sockets) as url:
            assert url == f"http://127.0.0.1:{port}"
            assert requests.get(url + "/health", timeout=5).json()["status"] == "ok"
        engine.stop()
    finally:
        for sock in sockets:
            sock.close()


def test_prefill_slice_takes_zero_but_not_less(capsys):
    assert chat_openai.parse_args(["--gguf_path", "x"]).prefill_slice is None  # the model decides
    assert chat_openai.parse_args(["--gguf_path", "x", "--prefill_slice", "0"]).prefill_slice == 0
    with pytest.raises(SystemExit) as exit_info:
        chat_openai.parse_args(["--gguf_path", "x.gguf", "--prefill_slice", "-1"])
    assert exit_info.value.code == 2 and "argument --prefill_slice: must be >= 0, got -1" in capsys.readouterr().err
