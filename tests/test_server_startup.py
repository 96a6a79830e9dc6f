"""Start-up refusals of chat_openai.py (issue 13): each is one `error:` line and exit status 2, never a
traceback, and never a server that starts and then fails every request."""

import importlib.util
import json
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGUF_MAGIC, GGUFValueType

import ktransformers.models.loader as loader
from ktransformers.gguf import GGUFError, open_gguf
from ktransformers.gguf.reader import read_gguf_file
from ktransformers.server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("chat_openai_startup", REPO / "chat_openai.py")
chat_openai = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat_openai)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real script; a server that wrongly starts is killed at `timeout` (the test then fails)."""
    return subprocess.run([sys.executable, str(REPO / "chat_openai.py"), *args, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in last


# ---------------------------------------------------------------- 5. a chat template that cannot render

@pytest.mark.parametrize("template, words, before_load", [
    ("{% if %}{{ x }}", ["chat template", "TemplateSyntaxError"], True),            # compiled before the load
    ("{{ raise_exception('this template needs tools') }}", ["chat template", "needs tools"], False),   # rendered after
])
def test_broken_chat_template_is_one_line_at_startup(template, words, before_load, tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_script("--model_path", str(model_dir), "--gguf_path", str(model_dir / "model.gguf"), timeout=90)
    assert_one_error_line(result, str(model_dir), *words)
    assert "Serving" not in result.stdout
    assert ("loading layers" not in result.stderr) == before_load


def test_broken_chat_template_in_the_gguf_fails_before_the_load(tiny_model_dir, tmp_path):
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(tiny_model_dir / "model.gguf")
    broken = tmp_path / "broken-template.gguf"
    writer = GGUFWriter(broken, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "tokenizer.chat_template"):
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    writer.add_chat_template("{% for m in messages %}{{ m.content }")
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_script("--gguf_path", str(broken), timeout=90)
    assert_one_error_line(result, str(broken), "chat template does not compile")
    assert "loading layers" not in result.stderr


# ---------------------------------------------------------------- 6. deeply nested metadata arrays

def nested_array_gguf(path: Path, depth: int) -> Path:
    """A GGUF header whose one metadata value is an array of an array of ... `depth` deep."""
    key = b"evil.nested"
    head = struct.pack("<IIQQ", GGUF_MAGIC, 3, 0, 1) + struct.pack("<Q", len(key)) + key
    head += struct.pack("<I", GGUFValueType.ARRAY)
    nest = struct.pack("<IQ", GGUFValueType.ARRAY, 1) * (depth - 1)
    path.write_bytes(head + nest + struct.pack("<IQ", GGUFValueType.UINT8, 0))
    return path


def test_deeply_nested_metadata_is_a_clear_gguf_error(tmp_path):
    crafted = nested_array_gguf(tmp_path / "nested.gguf", 100_000)
    with pytest.raises(GGUFError, match="nests arrays more than"):
        open_gguf(crafted)
    shallow = read_gguf_file(nested_array_gguf(tmp_path / "shallow.gguf", 3))
    assert shallow.metadata["evil.nested"] == [[[]]]


def test_deeply_nested_metadata_is_one_line_from_the_script(tmp_path):
    crafted = nested_array_gguf(tmp_path / "nested.gguf", 100_000)
    assert_one_error_line(run_script("--gguf_path", str(crafted), timeout=60), str(crafted), "nests arrays")


# ---------------------------------------------------------------- 8. an empty API key is refused

@pytest.fixture
def no_model_load(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("load_model was called: the empty key should have been refused first")
    monkeypatch.setattr(loader, "load_model", load_model)


@pytest.mark.parametrize("argv_key, env_key", [("", None), ("   ", None), (None, ""), (None, " ")])
def test_empty_api_key_is_refused(argv_key, env_key, tiny_model_dir, no_model_load, monkeypatch, capsys):
    if env_key is None:
        monkeypatch.delenv("KTRANSFORMERS_API_KEY", raising=False)
    else:
        monkeypatch.setenv("KTRANSFORMERS_API_KEY", env_key)
    argv = ["--gguf_path", str(tiny_model_dir / "model.gguf"), "--port", str(free_port())]
    if argv_key is not None:
        argv += ["--api_key", argv_key]
    with pytest.raises(SystemExit) as exc:
        chat_openai.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--api_key" in err and "empty" in err and "Traceback" not in err


def test_settings_refuse_an_empty_key_too():
    with pytest.raises(ValueError, match="api_key is empty"):
        ServerSettings(api_key="")
    assert ServerSettings(api_key=None).api_key is None


# ---------------------------------------------------------------- the hardening options themselves

def test_hardening_options_parse():
    from ktransformers.server.guards import is_loopback_bind

    args = chat_openai.parse_args(["--demo", "--cors_origins", "http://localhost:3000, https://chat.example",
                                   "--allowed_hosts", "gpu-box,proxy.example", "--max_connections", "50",
                                   "--idle_timeout", "20", "--shutdown_grace", "0"])
    assert args.cors_origins == ("http://localhost:3000", "https://chat.example")
    assert args.allowed_hosts == ("gpu-box", "proxy.example")
    assert (args.max_connections, args.idle_timeout, args.shutdown_grace) == (50, 20, 0)
    defaults = chat_openai.parse_args(["--demo"])
    assert defaults.cors_origins == () and defaults.allowed_hosts == ()
    assert [is_loopback_bind(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0", "192.168.1.5", "::")] == \
           [True, True, True, True, False, False, False]


@pytest.mark.parametrize("option, value", [("--max_connections", "0"), ("--idle_timeout", "0"),
                                           ("--shutdown_grace", "-1")])
def test_hardening_options_are_range_checked(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        chat_openai.parse_args(["--demo", option, value])
    assert exc.value.code == 2 and option in capsys.readouterr().err
