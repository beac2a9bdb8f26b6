"""The built-in tiny model: deterministic, loads offline, quantizes to 4-bit on CPU; and
base model resolution (cache folder, concurrent builds, clear errors)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cotune.worker.basemodel import BaseModelError, resolve_base_model
from cotune.worker.tinymodel import MARKER_FILE, TINY_LLAMA_NAME, build_tiny_llama

transformers = pytest.importorskip("transformers", reason="the tiny model needs the worker extra")
torch = pytest.importorskip("torch", reason="the tiny model needs the worker extra")

ROOT = Path(__file__).resolve().parents[3]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_same_seed_same_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(tiny_model_dir)
    other = build_tiny_llama(tmp_path / "other", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(again)["model.safetensors"]


def test_loads_offline_as_a_llama(tiny_model_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size <= 128 and model.config.num_hidden_layers == 2
    assert 512 <= model.config.vocab_size <= 1024 == len(tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    assert sorted(p.suffix for p in tiny_model_dir.glob("model*")) == [".safetensors"]


def test_tokenizer_round_trips_any_text(tiny_model_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = "Reverse: abc -> cba; naïve café ✓ 日本 \t{}[]\n" + "".join(map(chr, range(32, 127)))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids


def test_chat_template_renders_roles(tiny_model_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\nyo</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and text.startswith(prompt)


def test_quantizes_to_nf4_on_cpu(tiny_model_dir: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="4-bit needs bitsandbytes")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), quantization_config=config
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    ids = torch.tensor([[1, 50, 60, 70]])
    full = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        quantized_logits = model(input_ids=ids).logits
        full_logits = full(input_ids=ids).logits
    assert torch.isfinite(quantized_logits).all()
    # 4-bit weights: close to, but not the same as, the full-precision model.
    assert 0 < (quantized_logits - full_logits).abs().mean() < full_logits.abs().mean()


def test_builtin_model_builds_once_into_the_cache(tmp_path: Path) -> None:
    first = resolve_base_model("cotune://tiny-llama", cache_dir=tmp_path)
    assert first.local and Path(first.location) == tmp_path / TINY_LLAMA_NAME
    marker = Path(first.location) / MARKER_FILE
    built_at = marker.stat().st_mtime_ns
    assert resolve_base_model("cotune://tiny-llama", cache_dir=tmp_path) == first
    assert marker.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [TINY_LLAMA_NAME]  # no temp folders left


def test_concurrent_builds_agree(tmp_path: Path) -> None:
    results: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                resolve_base_model("cotune://tiny-llama", cache_dir=tmp_path)
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({r.location for r in results}) == 1
    assert [p.name for p in tmp_path.iterdir()] == [TINY_LLAMA_NAME]
    assert (tmp_path / TINY_LLAMA_NAME / MARKER_FILE).is_file()


def test_local_folder_and_hub_ids(tiny_model_dir: Path) -> None:
    local = resolve_base_model(str(tiny_model_dir), "ignored-for-folders")
    assert local.local and local.pretrained_kwargs() == {}
    hub = resolve_base_model("meta-llama/Llama-3.2-1B", "abc123")
    assert not hub.local and hub.pretrained_kwargs() == {"revision": "abc123"}


@pytest.mark.parametrize(
    ("base_model", "expected"),
    [
        ("cotune://huge-llama", "unknown built-in model; known: cotune://tiny-llama"),
        ("s3://bucket/models/x", "staged by the coordinator"),
        ("./no/such/folder", "no such folder"),
        ("", "base_model is empty"),
    ],
)
def test_bad_base_models_say_why(base_model: str, expected: str) -> None:
    with pytest.raises(BaseModelError, match=expected):
        resolve_base_model(base_model)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match=r"no config\.json"):
        resolve_base_model(str(tmp_path))


def test_offline_hub_load_gives_a_clear_error(tmp_path: Path) -> None:
    # No hub here: the real from_pretrained fails (offline mode set before huggingface_hub
    # is imported, so it fails at once), and the error says what to do.
    code = (
        "from cotune.orchestrator.protocol.task import TrainTask\n"
        "from worker.training import load_base\n"
        "load_base(TrainTask(base_model='cotune-test/no-such-model',\n"
        "                    base_model_revision='0123abc'))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert run.returncode != 0
    assert "BaseModelError" in run.stderr
    assert "'cotune-test/no-such-model' at revision 0123abc" in run.stderr
    assert "local folder" in run.stderr and "cotune://tiny-llama" in run.stderr
