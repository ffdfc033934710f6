import pytest
from pydantic import ValidationError

from common.settings import Settings, load_settings, parse_memory


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("MESH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MESH_HOME", str(tmp_path))


def test_defaults():
    s = load_settings()
    assert s.port == 9337 and s.api_bind_host == "127.0.0.1" and s.join == [] and s.model is None


def test_env_then_config_file_then_flags(monkeypatch, tmp_path):
    (tmp_path / "config.toml").write_text('port = 9400\nctx_size = 2048\nmax_vram = "6G"\n')
    monkeypatch.setenv("MESH_PORT", "9500")
    s = load_settings()
    assert s.port == 9500 and s.ctx_size == 2048 and s.max_vram == 6 << 30
    assert load_settings(port=9600).port == 9600


def test_lists_and_ratios_from_env(monkeypatch):
    monkeypatch.setenv("MESH_JOIN", "tok1,tok2")
    monkeypatch.setenv("MESH_TENSOR_SPLIT", "0.85,0.15")
    s = load_settings()
    assert s.join == ["tok1", "tok2"] and s.tensor_split == [0.85, 0.15]


def test_to_env_round_trips(monkeypatch):
    s = load_settings(join=["a", "b"], max_vram="1.5G", split=True, tensor_split="1,1", client=True)
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


@pytest.mark.parametrize("text,expected", [("8", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("1024B", 1024)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", [dict(port=0), dict(max_vram="lots"), dict(tensor_split="a,b"), dict(tensor_split="-1,2")])
def test_bad_values_are_rejected_with_a_reason(bad):
    with pytest.raises(ValidationError):
        load_settings(**bad)
