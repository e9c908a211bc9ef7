"""The SD text encoders, OpenCLIP ViT-H/14's text tower (SD 2.x) and OpenAI CLIP ViT-L/14's
(SD 1.x), and CLIP's tokenizer.

Reading order: (1) the byte-level BPE tokenizer (Radford et al. 2021, CLIP; Sennrich et al. 2016),
(2) the config, (3) the transformer, (4) loading the diffusers folder and the LDM single file.
Both run every block of their config, then the final LayerNorm. SD2 conditions on the output of
block 23 of OpenCLIP's 24 (`FrozenOpenCLIPEmbedder(layer="penultimate")`), so its model here has
23 blocks; SD 1.x on the last of CLIP-L's 12 (`FrozenCLIPEmbedder`: transformers'
last_hidden_state). Parameter names are transformers' CLIPTextModel names without the
`text_model.` prefix.
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

from checkpoint import find_weights, load_state, open_checkpoint, read_config

# ---------------------------------------------------------------------------------------------
# (1) Tokenizer: text -> (B, 77) token ids, exactly as transformers' CLIPTokenizer on an SD
# tokenizer/ folder (which is what diffusers runs)
# ---------------------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SD2's special_tokens_map.json sets pad_token "!", the byte token with id 0. transformers makes it
# a special token, so every "!" in a prompt becomes id 0 too, where open_clip (SD2's training,
# which also runs ftfy and html.unescape) has "!</w>" = 256. SD 1.x's folder (that of
# openai/clip-vit-large-patch14) pads with EOS, 49407 (docs/sd2_formats.md §8).
PAD = "!"
# The pad id of each model's tokenizer, for the empty prompt of a single file without its
# tokenizer/ folder (dmap.encode_prompt): bos 49406, eos 49407, then pads.
PAD_ID = {"sd1": 49407, "sd2": 0}
# transformers' special tokens {text: normalized}: they are split off before anything else, a
# normalized one in the lowercased text, another in the text as typed. SD2's folder: bos and eos
# normalized, the pad "!" (a plain string in special_tokens_map.json) not.
SD2_SPECIAL = {BOS: True, EOS: True, PAD: False}
# The special-token entries transformers reads, in its order (tokenization_utils_base.py
# SPECIAL_TOKENS_ATTRIBUTES), and CLIPTokenizer's defaults for the ones a folder leaves out.
SPECIAL_DEFAULTS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
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


def splitter(tokens):
    """text -> [text, token, text, token, ..., text]: split at each occurrence of `tokens`."""
    if not tokens:
        return lambda text: [text]
    longest_first = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, longest_first)) + ")").split


def special_tokens(folder: str) -> tuple[str, dict[str, bool]]:
    """The pad token and the special tokens {text: normalized} of a tokenizer/ folder, as
    transformers 5 reads them (measured on transformers 5.25, docs/sd2_formats.md §8): each
    entry of special_tokens_map.json overrides tokenizer_config.json's (tokenization_utils_base.py
    _from_pretrained), a missing one takes CLIPTokenizer's default (a plain string); an entry is
    an AddedToken's fields or a plain string (normalized false). In the order bos, eos, unk, pad,
    an entry equal to an earlier one is dropped, and the last one left decides its text's
    `normalized` (tokenization_utils_tokenizers.py __init__ adds them in one call).
    Neither file: SD 2's tokens, pad "!"."""
    names = [name for name in ("tokenizer_config.json", "special_tokens_map.json")
             if os.path.isfile(os.path.join(folder, name))]
    if not names:
        return PAD, SD2_SPECIAL
    entries = {}
    for name in names:  # the later file wins
        config = read_config(folder, name)
        entries |= {key: config[key] for key in SPECIAL_DEFAULTS if key in config}

    def token(entry) -> tuple:  # what tokenizers' AddedToken equality compares
        if isinstance(entry, str):
            return entry, False, "str"
        return (entry["content"], bool(entry.get("normalized", False)),
                *(bool(entry.get(k, False)) for k in ("lstrip", "rstrip", "single_word")))

    tokens = [token(entries.get(key, default)) for key, default in SPECIAL_DEFAULTS.items()]
    kept = [t for i, t in enumerate(tokens) if t not in tokens[:i]]
    return tokens[-1][0], {t[0]: t[1] for t in kept}  # tokens[-1]: the pad token's


class Tokenizer:
    """CLIP's byte-level BPE; `tokenizer(prompts)` -> (B, 77) ids: bos, tokens, eos, pads (SD2:
    "!" = 0; SD 1.x: eos). special: {text: normalized} of the special tokens (SD2_SPECIAL)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context: int = 77,
                 pad: str = PAD, special: dict[str, bool] = SD2_SPECIAL):
        self.vocab, self.context, self.pad = vocab, context, pad
        self.split_typed = splitter([t for t, normalized in special.items() if not normalized])
        self.split_normalized = splitter([t for t, normalized in special.items() if normalized])
        self.ranks = {pair: i for i, pair in enumerate(merges)}  # earlier merges apply first
        self.byte = bytes_to_unicode()
        self.cache = {}
        L, N = category_class("L"), category_class("N")
        # CLIP's pre-tokenizer regex (tokenization_clip.py): bos and eos as text, contractions,
        # letter runs, single digits, other runs
        self.pattern = re.compile(rf"{re.escape(BOS)}|{re.escape(EOS)}|'s|'t|'re|'ve|'m|'ll|'d"
                                  rf"|[{L}]+|[{N}]|[^{SPACE}{L}{N}]+")

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        """An SD `tokenizer/` folder: vocab.json and merges.txt (after a "#version: 0.2" line);
        its special tokens as transformers 5 reads them (special_tokens)."""
        paths = [os.path.join(folder, name) for name in ("vocab.json", "merges.txt")]
        for path in paths:
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file; expected an SD tokenizer/ folder "
                                 "(vocab.json + merges.txt)")
        with open(paths[0], encoding="utf-8") as f:
            vocab = json.load(f)
        with open(paths[1], encoding="utf-8") as f:
            lines = f.read().split("\n")
        lines = lines[1:] if lines[0].startswith("#version") else lines  # "#" is a token too
        pad, special = special_tokens(folder)
        unknown = [t for t in special if t not in vocab]
        if unknown:
            raise ValueError(f"{folder}: special token {unknown[0]!r} is not in vocab.json; "
                             "re-download the tokenizer/ folder")
        return cls(vocab, [tuple(line.split()) for line in lines if line], pad=pad,
                   special=special)

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
        ids = []
        for i, part in enumerate(self.split_typed(text)):  # special tokens as typed first
            if i % 2:
                ids.append(self.vocab[part])
                continue
            # transformers' normalizer: NFC, then a per-character lowercase (no final-sigma
            # rule); its whitespace collapsing changes nothing, as the regex drops whitespace
            part = "".join(c.lower() for c in unicodedata.normalize("NFC", part))
            for j, piece in enumerate(self.split_normalized(part)):
                if j % 2:  # a normalized special token
                    ids.append(self.vocab[piece])
                    continue
                for word in self.pattern.findall(piece):
                    # bos or eos as text (typed in capitals where they are not normalized):
                    # transformers' ByteLevel step splits it into "<|", the name, "|>"
                    for w in [word[:2], word[2:-2], word[-2:]] if word in (BOS, EOS) else [word]:
                        chars = "".join(self.byte[b] for b in w.encode("utf-8"))
                        ids.extend(self.vocab[token] for token in self.bpe(chars))
        return ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        assert not isinstance(prompts, str), "pass a list of prompts"
        rows = []
        for prompt in prompts:
            ids = [self.vocab[BOS], *self.encode(prompt)[:self.context - 2], self.vocab[EOS]]
            rows.append(ids + [self.vocab[self.pad]] * (self.context - len(ids)))
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
# stable-diffusion-v1-5 text_encoder/config.json: openai/clip-vit-large-patch14's text model
SD15_TEXT = TextConfig(width=768, heads=12, layers=12, mlp_width=3072, act="quick_gelu")
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
    """Token ids (B, T <= 77) -> the UNet's cross-attention context (B, T, width)."""

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


# LDM's FrozenCLIPEmbedder.transformer (SD 1.x): a transformers CLIPTextModel under its own names
# (diffusers single_file_utils.py LDM_CLIP_PREFIX_TO_REMOVE, convert_ldm_clip_checkpoint)
SD1_PREFIX = "cond_stage_model.transformer."


def sd1_key(key: str):
    """Rename for `load_state`: an SD 1.x single-file key -> ours, None for the other parts."""
    return transformers_key(key.removeprefix(SD1_PREFIX)) if key.startswith(SD1_PREFIX) else None


def single_file_family(path: str) -> str:
    """"sd1" when the single file holds SD 1.x's text encoder (cond_stage_model.transformer.*),
    else "sd2" (SD 2.x's cond_stage_model.model.*, which load_state then asks for)."""
    with open_checkpoint(path) as f:
        return "sd1" if any(key.startswith(SD1_PREFIX) for key in f.keys()) else "sd2"


def text_encoder_from_single_file(path: str, config: TextConfig | None = None, device=None,
                                  dtype=None) -> TextEncoder:
    """The text encoder of an LDM single-file checkpoint: SD 1.x's CLIP-L in transformers' names
    (v1-5-pruned-emaonly.safetensors) or SD 2.x's OpenCLIP text tower (512-base-ema.safetensors),
    told apart by the keys (single_file_family); config None: SD15_TEXT or SD2_TEXT."""
    sd1 = single_file_family(path) == "sd1"
    config = (SD15_TEXT if sd1 else SD2_TEXT) if config is None else config
    with torch.device("meta"):
        model = TextEncoder(config)
    rename = sd1_key if sd1 else (lambda key: openclip_key(key, config.layers))
    return load_state(model, path, rename, device, dtype)
