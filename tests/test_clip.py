"""clip.py against transformers' CLIPTextModel, CLIPTokenizer and diffusers' OpenCLIP converter."""

import importlib.util
import json
import os
import random
import re
from dataclasses import replace

import pytest
import torch
from conftest import assert_close, openclip_state
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from clip import (
    SD2_TEXT,
    TINY,
    TextConfig,
    TextEncoder,
    Tokenizer,
    load_text_encoder,
    text_encoder_from_single_file,
)


def hf_config(cfg: TextConfig) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context,
                          hidden_size=cfg.width, num_attention_heads=cfg.heads,
                          num_hidden_layers=cfg.layers, intermediate_size=cfg.mlp_width,
                          hidden_act=cfg.act, layer_norm_eps=cfg.eps)


def random_reference(cfg: TextConfig) -> CLIPTextModel:
    """transformers' model with every parameter random (LayerNorms too), so no swap goes unseen."""
    torch.manual_seed(0)
    model = CLIPTextModel(hf_config(cfg)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def random_ids(cfg: TextConfig, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=generator)


# ---------------------------------------------------------------------------------------------
# The model and its loaders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_diffusers_folder_matches_transformers(tmp_path, act):
    cfg = replace(TINY, act=act)
    ref = random_reference(cfg)
    ref.save_pretrained(tmp_path / "plain")  # transformers 5: safetensors, keys without prefix
    ids = random_ids(cfg)
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        ours = load_text_encoder(str(tmp_path / "plain"))
        assert_close(ours(ids), expected, 1e-4, what=f"last_hidden_state ({act})")

        # the layout of transformers 4.x files on the Hub: `text_model.` prefix, position_ids
        state = load_file(tmp_path / "plain/model.safetensors")
        state = {f"text_model.{k}": v for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(cfg.context)[None]
        os.makedirs(tmp_path / "prefixed")
        save_file(state, tmp_path / "prefixed/model.safetensors")
        (tmp_path / "prefixed/config.json").write_text((tmp_path / "plain/config.json").read_text())
        prefixed = load_text_encoder(str(tmp_path / "prefixed"))
        assert torch.equal(prefixed(ids), ours(ids))

    half = load_text_encoder(str(tmp_path / "plain"), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_single_file_matches_diffusers_conversion(tmp_path):
    # 23 blocks at toy width: diffusers drops exactly `resblocks.23` (its list of keys to ignore)
    cfg = replace(TINY, layers=SD2_TEXT.layers)
    state = openclip_state(cfg, torch.Generator().manual_seed(0))
    save_file(state, tmp_path / "sd2.safetensors")
    ref = CLIPTextModel(hf_config(cfg)).eval()
    converted = convert_open_clip_checkpoint(ref, state)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()
                 if k != "text_projection.weight"}  # CLIPTextModel has no projection
    ref.load_state_dict(converted, strict=True)
    ids = random_ids(cfg)
    with torch.no_grad():
        ours = text_encoder_from_single_file(str(tmp_path / "sd2.safetensors"), cfg)
        assert_close(ours(ids), ref(ids).last_hidden_state, 1e-4, what="single file")


def test_sd2_names_shapes_and_size():
    with torch.device("meta"):
        ours = TextEncoder(SD2_TEXT).state_dict()
        ref = CLIPTextModel(hf_config(SD2_TEXT)).state_dict()
    ref = {k.removeprefix("text_model."): v for k, v in ref.items()}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert sum(v.numel() for v in ours.values()) == 340_387_840  # docs/sd2_formats.md §0.4
    hub = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,  # §1.4
               num_hidden_layers=23, max_position_embeddings=77, vocab_size=49408,
               hidden_act="gelu", layer_norm_eps=1e-05, projection_dim=512)
    assert TextConfig.from_diffusers(hub) == SD2_TEXT


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_gz():
    spec = importlib.util.find_spec("open_clip")
    path = spec and os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    if not path or not os.path.isfile(path):
        pytest.skip("open_clip's bpe_simple_vocab_16e6.txt.gz (CLIP's vocabulary) is not installed")
    return path


@pytest.fixture(scope="module")
def sd2_tokenizer_folder(bpe_gz, tmp_path_factory):
    """SD2's tokenizer/ folder, written from the CLIP merges with transformers' byte table."""
    import gzip

    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    words = alphabet + [a + "</w>" for a in alphabet] + [m.replace(" ", "") for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = dict(content="", lstrip=False, normalized=True, rstrip=False, single_word=False)
    bos, eos = special | dict(content="<|startoftext|>"), special | dict(content="<|endoftext|>")
    (folder / "special_tokens_map.json").write_text(json.dumps(  # SD2's: pad "!" (id 0)
        dict(bos_token=bos, eos_token=eos, pad_token="!", unk_token=eos)))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        add_prefix_space=False, bos_token=bos, do_lower_case=True, eos_token=eos,
        errors="replace", model_max_length=77, pad_token="<|endoftext|>",
        tokenizer_class="CLIPTokenizer", unk_token=eos)))
    return str(folder)


def varied_prompts() -> list[str]:
    fixed = [
        "", " ", "\n\n", "a photo of an astronaut riding a horse on mars",
        "A PHOTO of an Astronaut!!", "wow! really?! yes!", "!", "!!!", "?!?", "hello, world.",
        "it's", "don't", "we're", "I'M", "you'll", "he'd", "they've", "'s", "''s", "rock'n'roll",
        "café", "cafe\u0301", "naïve Ünïcödé", "İstanbul", "ΟΔΟΣ", "straße", "ﬁne", "Ǆemal",
        "漢字", "日本語のテキスト", "한국어 문장", "مرحبا بالعالم", "हिन्दी", "ภาษาไทย",
        "🚀", "👩‍🚀 on the moon 🌕", "🇫🇷", "12345", "3.14159", "1,000,000", "²½Ⅻ", "٣٤",
        "multiple   spaces", "tabs\tand\nnewlines\r\n", "nbsp\xa0here", "ideographic\u3000space",
        "file\x1cseparator", "zero\u200bwidth", "<|endoftext|>", "x<|startoftext|>y",
        "<|ENDOFTEXT|>", "snake_case-and-kebab", "e-mail: a@b.com", "$100 #tag @user",
        "(parens) [brackets] {braces}", "\"quotes\" «guillemets»", "—dashes–", "…ellipsis",
        " ".join(["word"] * 100), "x" * 300, "a, " * 60, "🚀" * 40,
    ]
    rng = random.Random(0)
    pool = [p for p in fixed if p] + ["the", "of", "a", "horse", "'t", "'ll", ".", ",", "!", " ",
                                      "\n", "7", "ü", "ß", "中", "🙂", "Σ", "--", "...", "'"]
    random_ones = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(250)]
    return fixed + random_ones


def test_tokenizer_matches_transformers(sd2_tokenizer_folder, bpe_gz):
    ref = CLIPTokenizer.from_pretrained(sd2_tokenizer_folder)
    assert (ref.pad_token, ref.pad_token_id, ref.model_max_length) == ("!", 0, 77)
    ours, from_gz = Tokenizer.from_folder(sd2_tokenizer_folder), Tokenizer.from_bpe_gz(bpe_gz)
    assert from_gz.vocab == ours.vocab and from_gz.ranks == ours.ranks
    prompts = varied_prompts()
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True,
                   return_tensors="pt").input_ids
    got = ours(prompts)
    bad = [p for p, a, b in zip(prompts, got, expected, strict=True) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} of {len(prompts)} prompts differ, first: {bad[0]!r}"
    assert torch.equal(from_gz(prompts), got)

    known = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]  # §1.5
    assert ours(["a photo of an astronaut riding a horse on mars"])[0].tolist() == known + [0] * 65
    assert ours([""])[0].tolist() == [49406, 49407] + [0] * 75


# ---------------------------------------------------------------------------------------------
# Bad input: one ValueError that names the file
# ---------------------------------------------------------------------------------------------


def test_bad_input(tmp_path):
    ref = random_reference(TINY)
    ref.save_pretrained(tmp_path / "good")
    state = load_file(tmp_path / "good/model.safetensors")
    config = (tmp_path / "good/config.json").read_text()

    def folder(name, weights=None, raw=None, cfg=config):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(cfg)
        if weights is not None:
            save_file(weights, tmp_path / name / "model.safetensors")
        if raw is not None:
            (tmp_path / name / "model.safetensors").write_bytes(raw)
        return str(tmp_path / name)

    key = "encoder.layers.0.mlp.fc1.weight"
    cases = {  # folder -> what the message must name
        str(tmp_path / "absent"): "no such folder",
        folder("no_weights"): "model.safetensors",
        folder("pickle", raw=b"\x80\x04not safetensors"): "not a readable safetensors",
        folder("missing", {k: v for k, v in state.items() if k != key}): "missing",
        folder("misshaped", state | {key: state[key][:-1]}): "misshaped",
        folder("relu", state, cfg=config.replace('"gelu"', '"relu"')): "hidden_act",
    }
    for path, what in cases.items():
        with pytest.raises(ValueError, match=re.escape(path)) as error:
            load_text_encoder(path)
        assert what in str(error.value)

    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "absent.safetensors"))):
        text_encoder_from_single_file(str(tmp_path / "absent.safetensors"), TINY)
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)},
              tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="missing"):
        text_encoder_from_single_file(str(tmp_path / "unet.safetensors"), TINY)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "vocab.json"))):
        Tokenizer.from_folder(str(tmp_path))
    with pytest.raises(ValueError, match="bpe_simple_vocab"):
        Tokenizer.from_bpe_gz(str(tmp_path / "absent.txt.gz"))
