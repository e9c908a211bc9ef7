"""The SD 2.0 text encoder: OpenCLIP ViT-H/14's text tower (penultimate layer) and CLIP's tokenizer.

Reading order: (1) the byte-level BPE tokenizer (Radford et al. 2021, CLIP; Sennrich et al. 2016),
(2) the config, (3) the transformer, (4) loading the diffusers folder and the LDM single file.
SD2 conditions on the output of block 23 of OpenCLIP's 24, followed by the final LayerNorm
(`FrozenOpenCLIPEmbedder(layer="penultimate")`), so the model here has 23 blocks. Parameter names
are transformers' CLIPTextModel names without the `text_model.` prefix.
"""

import gzip
import itertools
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import find_weights, load_state, read_config

# ---------------------------------------------------------------------------------------------
# (1) Tokenizer: text -> (B, 77) token ids, exactly as transformers' CLIPTokenizer on SD2's
# tokenizer/ folder (which is what diffusers runs)
# ---------------------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SD2's special_tokens_map.json sets pad_token "!", the byte token with id 0. transformers makes it
# a special token, so every "!" in a prompt becomes id 0 too, where open_clip (SD2's training,
# which also runs ftfy and html.unescape) has "!</w>" = 256. Special tokens are split off first.
PAD = "!"
SPECIAL = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>|!)")
# Unicode White_Space, which the tokenizers library's \s matches (Python's \s adds \x1c-\x1f)
SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's table from the 256 bytes to printable characters (the BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    rest = [b for b in range(256) if b not in bs]  # whitespace and control bytes move to 256+
    return {b: chr(b) for b in bs} | {b: chr(256 + n) for n, b in enumerate(rest)}  # CLIP's order


def category_class(major: str) -> str:
    """The regex class body of Unicode category `major`: \\p{L}, \\p{N}, which `re` lacks."""
    codes = (c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] == major)
    runs = itertools.groupby(enumerate(codes), key=lambda ic: ic[1] - ic[0])  # consecutive codes
    spans = [[c for _, c in run] for _, run in runs]
    return "".join(f"{re.escape(chr(s[0]))}-{re.escape(chr(s[-1]))}" for s in spans)


class Tokenizer:
    """CLIP's byte-level BPE; `tokenizer(prompts)` -> (B, 77) ids: bos, tokens, eos, pad 0."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context: int = 77):
        self.vocab, self.context = vocab, context
        self.ranks = {pair: i for i, pair in enumerate(merges)}  # earlier merges apply first
        self.byte = bytes_to_unicode()
        self.cache = {}
        L, N = category_class("L"), category_class("N")
        # CLIP's pre-tokenizer regex: contractions, letter runs, single digits, other runs
        self.pattern = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|[{L}]+|[{N}]|[^{SPACE}{L}{N}]+")

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        """SD2's `tokenizer/` folder: vocab.json and merges.txt (after a "#version: 0.2" line)."""
        paths = [os.path.join(folder, name) for name in ("vocab.json", "merges.txt")]
        for path in paths:
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file; expected SD2's tokenizer/ folder "
                                 "(vocab.json + merges.txt)")
        with open(paths[0], encoding="utf-8") as f:
            vocab = json.load(f)
        with open(paths[1], encoding="utf-8") as f:
            lines = f.read().split("\n")
        lines = lines[1:] if lines[0].startswith("#version") else lines  # "#" is a token too
        return cls(vocab, [tuple(line.split()) for line in lines if line])

    @classmethod
    def from_bpe_gz(cls, path: str) -> "Tokenizer":
        """open_clip's `bpe_simple_vocab_16e6.txt.gz`; the vocabulary is built as CLIP does."""
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file; pass open_clip's bpe_simple_vocab_16e6.txt.gz")
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # CLIP's slice
        alphabet = list(bytes_to_unicode().values())
        words = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
        return cls({w: i for i, w in enumerate(words + [BOS, EOS])}, merges)

    def bpe(self, word: str) -> list[str]:
        """Merge the characters of `word` (its last one marked </w>) by merge rank, as CLIP."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(itertools.pairwise(parts), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of `pair`, left to right
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without bos/eos."""
        # transformers' normalizer: NFC, then a per-character lowercase (no final-sigma rule);
        # its whitespace collapsing changes nothing, as the split below drops whitespace
        text = "".join(c.lower() for c in unicodedata.normalize("NFC", text))
        ids = []
        for i, piece in enumerate(SPECIAL.split(text)):
            if i % 2:  # a special token, split off before the regex as transformers does
                ids.append(self.vocab[piece])
                continue
            for word in self.pattern.findall(piece):
                chars = "".join(self.byte[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[token] for token in self.bpe(chars))
        return ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        assert not isinstance(prompts, str), "pass a list of prompts"
        rows = []
        for prompt in prompts:
            ids = [self.vocab[BOS], *self.encode(prompt)[:self.context - 2], self.vocab[EOS]]
            rows.append(ids + [self.vocab[PAD]] * (self.context - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, 77)


# ---------------------------------------------------------------------------------------------
# (2) Config
# ---------------------------------------------------------------------------------------------


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's approximation
}


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context: int = 77  # positions
    width: int = 1024
    heads: int = 16  # of dim 64
    layers: int = 23  # OpenCLIP ViT-H/14 has 24; SD2 uses the penultimate output
    mlp_width: int = 4096
    act: str = "gelu"  # exact erf GELU; OpenAI's CLIP models use "quick_gelu"
    eps: float = 1e-5  # LayerNorm

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "TextConfig":
        """Read a transformers CLIPTextModel config.json (text_encoder/config.json)."""
        names = dict(vocab_size="vocab_size", context="max_position_embeddings",
                     width="hidden_size", heads="num_attention_heads",
                     layers="num_hidden_layers", mlp_width="intermediate_size",
                     act="hidden_act", eps="layer_norm_eps")
        missing = [theirs for theirs in names.values() if theirs not in cfg]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}; expected a CLIPTextModel config")
        if cfg["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; expected one of "
                             f"{', '.join(ACTIVATIONS)}")
        return cls(**{ours: cfg[theirs] for ours, theirs in names.items()})


SD2_TEXT = TextConfig()
TINY = TextConfig(width=32, heads=4, layers=2, mlp_width=64)  # tests; real token ids still work

# ---------------------------------------------------------------------------------------------
# (3) The transformer (open_clip `TextTransformer`; transformers `CLIPTextTransformer`)
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal multi-head self-attention (open_clip: nn.MultiheadAttention with fused q;k;v)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        assert cfg.width % cfg.heads == 0, "width must be a multiple of heads"
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, heads, T, C / heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # causal mask only: padding tokens are attended by nothing before them, as in SD2
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)  # open_clip c_fc
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)  # open_clip c_proj
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN residual block (open_clip ResidualAttentionBlock; transformers CLIPEncoderLayer)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)  # open_clip ln_1
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)  # open_clip ln_2
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TextEncoder(nn.Module):
    """Token ids (B, T <= 77) -> SD2's cross-attention context (B, T, width)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
            position_embedding=nn.Embedding(cfg.context, cfg.width),  # learned, absolute
        ))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(Block(cfg)
                                                               for _ in range(cfg.layers))))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # open_clip ln_final

    def forward(self, ids):
        T = ids.shape[1]
        assert T <= self.cfg.context, f"{T} tokens, at most {self.cfg.context}"
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:T]
        for block in self.encoder.layers:
            x = block(x)
        return self.final_layer_norm(x)  # (B, T, width)


# ---------------------------------------------------------------------------------------------
# (4) Loading: the diffusers folder (text_encoder/) and the LDM single file
# ---------------------------------------------------------------------------------------------


def transformers_key(key: str):
    """Rename for `load_state`: files saved by transformers 4.x carry `text_model.` and an int64
    position_ids buffer (arange(77)); files saved by transformers 5 have neither."""
    return None if key.endswith("position_ids") else key.removeprefix("text_model.")


def load_text_encoder(folder: str, device=None, dtype=None) -> TextEncoder:
    """A diffusers/transformers text_encoder/ folder: config.json + model[.fp16].safetensors."""
    config = read_config(folder)
    try:
        cfg = TextConfig.from_diffusers(config)
    except ValueError as e:
        raise ValueError(f"{os.path.join(folder, 'config.json')}: {e}") from None
    with torch.device("meta"):
        model = TextEncoder(cfg)
    return load_state(model, find_weights(folder, "model"), transformers_key, device, dtype)


PREFIX = "cond_stage_model.model."  # LDM's FrozenOpenCLIPEmbedder.model (visual tower deleted)
OPENCLIP = {  # OpenCLIP -> ours, outside the blocks (None: CLIP's image-text head, unused)
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
    "text_projection": None,
    "logit_scale": None,
}
OPENCLIP_BLOCK = {  # OpenCLIP -> ours, inside block i; attn.in_proj_* is split below
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openclip_key(key: str, layers: int = SD2_TEXT.layers):
    """Rename for `load_state`: an LDM single-file key -> ours, None to skip, or a q/k/v split."""
    if not key.startswith(PREFIX):
        return None  # UNet, VAE
    name = key.removeprefix(PREFIX)
    block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)", name)
    if block is None:
        return OPENCLIP.get(name, name)  # an unknown name stays, and load_state rejects it
    i, module, param = int(block[1]), block[2], block[3]
    if i >= layers:
        return None  # OpenCLIP's last block(s): SD2 takes the penultimate output
    if module == "attn" and param.startswith("in_proj_"):  # rows q;k;v fused in one tensor
        kind = param.removeprefix("in_proj_")
        return {f"encoder.layers.{i}.self_attn.{qkv}_proj.{kind}": lambda t, j=j: t.chunk(3)[j]
                for j, qkv in enumerate("qkv")}
    return f"encoder.layers.{i}.{OPENCLIP_BLOCK.get(module, module)}.{param}"


def text_encoder_from_single_file(path: str, config: TextConfig = SD2_TEXT, device=None,
                                  dtype=None) -> TextEncoder:
    """The text encoder of an LDM single-file checkpoint (`512-base-ema.safetensors` layout)."""
    with torch.device("meta"):
        model = TextEncoder(config)
    return load_state(model, path, lambda key: openclip_key(key, config.layers), device, dtype)
