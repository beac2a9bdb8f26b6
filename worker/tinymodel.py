"""The built-in tiny model (`cotune://tiny-llama`): a seeded random Llama and a local tokenizer.

No hub is reachable in tests, CI or the CPU example, so this module builds a stand-in for a
hub model: a 2-layer `LlamaForCausalLM` (its architecture is `TINY_LLAMA_CONFIG` in
orchestrator/protocol/builtin_models.py) with seeded random weights and a byte-level BPE
tokenizer trained by `tokenizers` on a built-in corpus. The result is an ordinary Hugging
Face folder that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`
load offline, and that PEFT adapters can name as their base. Same seed => same bytes.

Example: python -c "from pathlib import Path; from cotune.worker.tinymodel import
build_tiny_llama; build_tiny_llama(Path('/tmp/tiny'))"
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cotune.orchestrator.protocol.builtin_models import TINY_LLAMA_CONFIG

# Bump when anything below changes the built folder: cache folders are keyed by it.
TINY_LLAMA_VERSION = 2
TINY_LLAMA_NAME = f"tiny-llama-{TINY_LLAMA_VERSION}"
MARKER_FILE = "cotune-tiny-model.json"

# The architecture is protocol (the coordinator places tasks by it); the tokenizer is trained
# to exactly its vocabulary size.
VOCAB_SIZE: int = TINY_LLAMA_CONFIG["vocab_size"]
MAX_POSITIONS: int = TINY_LLAMA_CONFIG["max_position_embeddings"]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]

# One turn per message, closed by EOS so the model learns where an answer ends; the
# `generation` block lets `apply_chat_template(..., return_assistant_tokens_mask=True)`
# mark the assistant's tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_WORD_TEXT = (
    "the a an of to and in is it you that he was for on are with as his they be at one have "
    "this from or had by word but what some we can out other were all there when up use your "
    "how said each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find "
    "add subtract multiply reverse sort count repeat copy upper lower list letters digits "
    "answer question instruction input response user assistant system translate sum total"
)
_WORDS = _WORD_TEXT.split()

# The alpaca prompt templates (orchestrator/protocol/render.py) and the synthetic tasks' phrasing
# (orchestrator/data/synthetic.py): frequent in the corpus, so they compress to few tokens and the
# tiny example's short sequences keep room for the answers.
_TEMPLATE_LINES = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "### Instruction:",
    "### Input:",
    "### Response:",
)
_TASK_PHRASES = (
    ("Reverse the letters.", "reverse"),
    ("Repeat the word twice.", "repeat twice"),
    ("Say the three letters that follow.", "next letters after"),
    ("Write the word in capitals.", "uppercase"),
    ("Sort the letters.", "sort"),
)


def corpus_lines(seed: int = 0, n: int = 4000) -> list[str]:
    """The tokenizer's training text: templates, task phrases, words and every ASCII byte."""
    rng = random.Random(seed)
    lines = [string.printable, string.ascii_letters, string.digits, string.punctuation]
    lines += list(_TEMPLATE_LINES) * 50
    for _ in range(n):
        kind = rng.randrange(4)
        word = "".join(rng.choice(string.ascii_lowercase[:10]) for _ in range(rng.randint(2, 5)))
        if kind == 0:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))))
        elif kind == 1:
            nums = [str(rng.randint(0, 999)) for _ in range(rng.randint(2, 8))]
            lines.append(f"{rng.choice(_WORDS)}: " + ", ".join(nums))
        else:
            instruction, task = rng.choice(_TASK_PHRASES)
            lines.append(f"{instruction} ({task})\n{task}: {word} => {word[::-1]} {word.upper()}")
    return lines


def _train_tokenizer(seed: int):  # -> PreTrainedTokenizerFast (heavy import kept local)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # Every byte gets a token, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
    )


def build_tiny_llama(
    out_dir: Path, seed: int = 0, *, architecture: Mapping[str, Any] | None = None
) -> Path:
    """Write the tiny model + tokenizer into `out_dir` (created; must be empty or absent).

    `architecture` overrides config.json fields of TINY_LLAMA_CONFIG (hidden_size,
    num_hidden_layers, ...; the vocabulary stays the tokenizer's) for a larger random-init
    model with the same tokenizer: bench/quality's second model. Only the default is the
    built-in `cotune://tiny-llama`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: folder is not empty; the tiny model needs a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(seed)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    shape = {**TINY_LLAMA_CONFIG, **(architecture or {})}
    if shape["vocab_size"] != VOCAB_SIZE:
        raise ValueError(f"vocab_size is the tokenizer's, {VOCAB_SIZE}")
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # The global RNG is the one transformers' weight init draws from; fork it so building
    # the model leaves the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # LoRA leaves lm_head frozen and the final RMSNorm fixes the hidden state's norm
        # near sqrt(hidden), so lm_head's scale bounds how sharp the output can get: with the
        # usual 0.02 init logits span about +-1.3 and the loss can barely fall. This scale
        # gives logits of std ~2 at init, like a trained model's.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 2.0 / shape["hidden_size"] ** 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker: dict[str, Any] = {"name": "tiny-llama", "version": TINY_LLAMA_VERSION, "seed": seed}
    if architecture:
        marker["architecture"] = dict(architecture)
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir
