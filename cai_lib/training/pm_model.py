"""The preference model (PM): a causal-LM backbone plus a scalar head on the last real token.

A PM scores one (conversation, response) pair with a reward r. Text is rendered with the
tokenizer's chat template, the response as the final assistant turn, and cut from the LEFT so
the end of the response (what is being judged) always survives. Saved and loaded as a
safetensors-only folder (pickle weight files are refused). Training: `cai_lib.training.pm_train`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cai_lib.backends.weights import DTYPE_NAMES, assert_no_pickles, dtype_name, resolve_dtype, torch_dtype
from cai_lib.files import atomic_folder, write_json
from cai_lib.sources.prompts import split_dialogue

__all__ = ["PreferenceModel", "prompt_turns", "render", "render_mode", "PM_CONFIG", "HEAD_FILE"]

PM_CONFIG = "pm_config.json"
HEAD_FILE = "score_head.safetensors"
PM_FORMAT, PM_VERSION = "cai-pm", 1


# ---------------------------------------------------------------- text rendering

def prompt_turns(prompt: str) -> list[dict]:
    """Chat messages for the conversation before the response. `prompt` is what
    preference_dataset holds: "Human: ..." dialogue text (`preferences.dialogue_text`) or a
    plain single user prompt.

    >>> prompt_turns("Human: hi\\n\\nAssistant: yo\\n\\nHuman: and now?")  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},
     {'role': 'user', 'content': 'and now?'}]
    >>> prompt_turns("  How do I bake bread? ")
    [{'role': 'user', 'content': 'How do I bake bread?'}]
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    turns = split_dialogue(prompt) if prompt.lstrip().startswith(("Human:", "Assistant:")) else []
    if turns and turns[-1] == ("assistant", ""):
        turns = turns[:-1]                      # a trailing "Assistant:" cue: the response fills it
    if not turns:
        return [{"role": "user", "content": prompt.strip()}]
    return [{"role": "user" if role == "human" else "assistant", "content": text} for role, text in turns]


def render_mode(tokenizer) -> str:
    """'chat_template' when the tokenizer has one; base models get the HH text format."""
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "hh_text"


def render(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids of the conversation with `response` as the final assistant turn, keeping
    the LAST `max_length` tokens: the PM reads the end, so the end must never be cut."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    messages = prompt_turns(prompt) + [{"role": "assistant", "content": response.strip()}]
    if render_mode(tokenizer) == "chat_template":
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    else:   # the HH-RLHF layout, ended by EOS so the last token marks "response finished"
        from cai_lib.feedback.preferences import dialogue_text   # here: preferences imports pyarrow
        turns = [("human" if m["role"] == "user" else "assistant", m["content"]) for m in messages]
        text = "\n\n" + dialogue_text(turns) + (tokenizer.eos_token or "")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[-max_length:])


# ---------------------------------------------------------------- the model

class PreferenceModel(nn.Module):
    """reward = Linear(hidden state of the last real token). The head stays float32 whatever
    the backbone dtype; which token is last comes from the attention mask, so right (or left)
    padding does not change a text's score."""

    def __init__(self, backbone: nn.Module, tokenizer, head: nn.Linear | None = None, *,
                 max_length: int = 512):
        super().__init__()
        hidden = backbone.config.hidden_size
        self.backbone, self.tokenizer, self.max_length = backbone, tokenizer, max_length
        self.head = head if head is not None else nn.Linear(hidden, 1)
        if self.head.in_features != hidden or self.head.out_features != 1:
            raise ValueError(f"head must be Linear({hidden}, 1) for this backbone, got "
                             f"Linear({self.head.in_features}, {self.head.out_features})")
        self.head.float()
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token   # padding is masked out: any id will do
        tokenizer.padding_side = "right"

    @classmethod
    def from_backbone(cls, model: str | Path, *, dtype: str | None = None, seed: int = 0,
                      max_length: int = 512) -> "PreferenceModel":
        """A fresh PM on a causal-LM checkpoint ('default', a folder or a cached hub id); the head
        is drawn from `seed` (std = the backbone's initializer_range, as HF score heads)."""
        from transformers import AutoModel, AutoTokenizer

        from cai_lib.backends.models import resolve_model
        folder = resolve_model(str(model))
        if isinstance(folder, Path) and not any(folder.glob("*.safetensors")):
            raise ValueError(f"model folder {folder} has no *.safetensors weights; PMs load safetensors "
                             "only. Fix: convert the checkpoint (save_pretrained writes safetensors).")
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)} or None, got {dtype!r}")
        backbone = AutoModel.from_pretrained(folder, dtype=torch_dtype(dtype) if dtype else "auto",
                                             use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        hidden = backbone.config.hidden_size
        head = nn.Linear(hidden, 1)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            head.weight.normal_(0.0, getattr(backbone.config, "initializer_range", 0.02), generator=gen)
            head.bias.zero_()
        return cls(backbone, tokenizer, head, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # -- scoring --------------------------------------------------------------------------
    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """float32 hidden state of each row's last real token, shape (batch, hidden)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        last = attention_mask.size(1) - 1 - attention_mask.flip(1).int().argmax(1)   # last 1 in the mask
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last].float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.features(input_ids, attention_mask)).squeeze(-1)

    def batch(self, ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Right-padded (input_ids, attention_mask) on the model's device."""
        if not ids or any(len(x) == 0 for x in ids):
            raise ValueError("every sequence needs at least one token")
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(list(x), dtype=torch.long)
            mask[i, :len(x)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 8) -> Tensor:
        """Rewards (float32, CPU) of token-id sequences, in eval mode, `batch_size` at a time."""
        was_training = self.training
        self.eval()
        try:
            out = [self(*self.batch(ids[i:i + batch_size])).cpu() for i in range(0, len(ids), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, texts: Sequence[str], batch_size: int = 8) -> Tensor:
        """Rewards of already-rendered texts (tokenized as given, cut from the left)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str, not one str")
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-self.max_length:] for t in texts]
        return self.score_ids(ids, batch_size)

    def score_pairs(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8) -> Tensor:
        """Rewards of (conversation, response) pairs rendered with `render`."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts has {len(prompts)} items but responses has {len(responses)}")
        ids = [render(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        return self.score_ids(ids, batch_size)

    # -- folder ---------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: Mapping | None = None) -> Path:
        """Write backbone (safetensors) + score_head.safetensors + pm_config.json + tokenizer.
        Written to a sibling temp folder and renamed: a crash never leaves half a PM."""
        folder = Path(folder)
        check_out_dir(folder)
        cfg = {"format": PM_FORMAT, "version": PM_VERSION,
               "backbone_type": self.backbone.config.model_type,
               "backbone_class": type(self.backbone).__name__,
               "hidden_size": self.backbone.config.hidden_size,
               "dtype": dtype_name(next(self.backbone.parameters()).dtype),
               "head": {"file": HEAD_FILE, "reads": "last_real_token"},
               "render": {"mode": render_mode(self.tokenizer), "max_length": self.max_length,
                          "truncation": "left"},
               **dict(extra or {})}
        with atomic_folder(folder) as tmp:          # replaces an earlier PM (checked above), or an empty folder
            self.backbone.save_pretrained(tmp)
            save_file({"weight": self.head.weight.detach().cpu().contiguous(),
                       "bias": self.head.bias.detach().cpu().contiguous()}, str(tmp / HEAD_FILE))
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / PM_CONFIG, cfg)
            assert_no_pickles(tmp)                  # save_pretrained must have written safetensors
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | None = None,
             dtype: str | None = None) -> "PreferenceModel":
        """A saved PM, computing in `dtype`; None = the dtype it was saved in, or float32 where
        `resolve_dtype("auto", device)` says so (a CPU without bf16 instructions: widening bf16
        weights to float32 is exact and scores 5x faster there)."""
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"PM folder {folder} does not exist; train one with train_pm")
        assert_no_pickles(folder)
        if not (folder / PM_CONFIG).is_file():
            raise ValueError(f"{folder} has no {PM_CONFIG}, so it is not a PM folder. Fix: point at "
                             "the out_dir of train_pm (or a folder written by PreferenceModel.save).")
        cfg = json.loads((folder / PM_CONFIG).read_text())
        if cfg.get("format") != PM_FORMAT or cfg.get("version") != PM_VERSION:
            raise ValueError(f"{folder / PM_CONFIG}: format {cfg.get('format')!r} version "
                             f"{cfg.get('version')!r}; this code reads {PM_FORMAT!r} version {PM_VERSION}")
        if dtype is None:
            on = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = "float32" if resolve_dtype("auto", str(on)) == "float32" else cfg["dtype"]
        backbone = AutoModel.from_pretrained(folder, dtype=torch_dtype(dtype), use_safetensors=True)
        weights = load_file(str(folder / cfg["head"]["file"]))
        head = nn.Linear(cfg["hidden_size"], 1)
        head.load_state_dict(weights)
        pm = cls(backbone, AutoTokenizer.from_pretrained(folder), head,
                 max_length=cfg["render"]["max_length"])
        if render_mode(pm.tokenizer) != cfg["render"]["mode"]:
            raise ValueError(f"{folder}: the PM was trained with render mode {cfg['render']['mode']!r} "
                             f"but its tokenizer now gives {render_mode(pm.tokenizer)!r}")
        return pm.to(device) if device else pm


def check_out_dir(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir())
                                                    and not (folder / PM_CONFIG).exists())):
        raise ValueError(f"out_dir {folder} exists and is not an empty folder or an earlier PM; "
                         "refusing to replace it. Fix: choose a new folder.")
