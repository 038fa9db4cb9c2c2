"""A Hugging Face-format Qwen2 directory (as `save_pretrained` writes it) becomes the VLM's LLM, offline; a base
directory's weights must be the ones its base.json hashes; unreadable weight files are named."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prismatic.models import BaseModelConfig, build_vla
from prismatic.models.configuration import get_config
from prismatic.models.loading import (
    BaseModelError,
    base_config_from_ref,
    load_base_dir,
    random_base,
    resolve_base,
    save_base_dir,
)
from prismatic.models.modeling import Qwen2ForCausalLM, make_projector, qwen2_hf_config
from prismatic.models.pretrained import from_pretrained, save_pretrained
from prismatic.models.prismatic_weights import load_prismatic_checkpoint
from prismatic.models.processing import build_tiny_tokenizer

CFG = get_config("tiny")


def base_weight(vlm_sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A base weight of the VLM, whether or not LoRA wrapped its layer (`….base_layer.weight`)."""
    if name in vlm_sd:
        return vlm_sd[name]
    module, _, param = name.rpartition(".")
    return vlm_sd[f"{module}.base_layer.{param}"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    torch.manual_seed(11)
    llm = Qwen2ForCausalLM(qwen2_hf_config(CFG))
    d = tmp_path_factory.mktemp("Qwen2.5-tiny")
    llm.save_pretrained(d)
    return d, {k: v.detach().clone() for k, v in llm.state_dict().items()}


def test_hf_qwen_dir_loads_through_build_vla(qwen_dir):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: any Hub lookup would fail, not retry
    d, want = qwen_dir
    model = build_vla(CFG, BaseModelConfig(llm_path=d, random_seed=0), seed=0)
    got = model.vlm.state_dict()
    for k, v in want.items():
        assert torch.equal(base_weight(got, f"llm.{k}"), v), k
    # the tied output head really is the embedding, and the model runs on it
    assert torch.equal(base_weight(got, "llm.lm_head.weight"), want["model.embed_tokens.weight"])
    batch = model.processor(["pick up the cube"], np.zeros((1, 2, 64, 64, 3), np.uint8), np.zeros((1, 8)))
    assert torch.isfinite(model.predict_action(**batch)).all()
    assert model.base_ref["kind"] == "files" and model.base_ref["llm_path"] == str(d.resolve())


def test_hf_qwen_dir_plus_prismatic_checkpoint(qwen_dir, tmp_path):
    """The Prismatic checkpoint's LLM (fine-tuned in VLM training) replaces the plain Qwen weights."""
    d, _ = qwen_dir
    torch.manual_seed(12)
    tuned = {f"llm.{k}": v.detach().clone() for k, v in Qwen2ForCausalLM(qwen2_hf_config(CFG)).state_dict().items()}
    proj = {f"projector.{k}": v for k, v in make_projector(CFG.vision_dim, CFG.llm.hidden_size).state_dict().items()}
    torch.save({"model": {"projector": proj, "llm_backbone": tuned}}, tmp_path / "latest-checkpoint.pt")
    assert load_prismatic_checkpoint(tmp_path / "latest-checkpoint.pt", CFG).keys() == {*proj, *tuned}
    model = build_vla(CFG, BaseModelConfig(llm_path=d, prismatic_checkpoint=tmp_path / "latest-checkpoint.pt",
                                           random_seed=0))
    got = model.vlm.state_dict()
    for k, v in {**tuned, **proj}.items():
        assert torch.equal(base_weight(got, k), v), k


def test_missing_qwen_dir_says_where_to_put_it(tmp_path):
    where = tmp_path / "pretrained_models" / "Qwen2.5-0.5B"
    with pytest.raises(BaseModelError, match=r"no Qwen2\.5-0\.5B weights at .*Qwen2\.5-0\.5B: put the Hugging Face"):
        build_vla(CFG, BaseModelConfig(llm_path=where))


def test_missing_base_dir_points_at_the_converter(tmp_path):
    """finetune_libero.sh's default base before convert_base.py has run: named as a base directory, not as Qwen's."""
    where = tmp_path / "pretrained_models" / "mergevla-base-qwen25-dinosiglip-224px"
    with pytest.raises(BaseModelError, match=r"base\.json not found: .*mergevla-base-qwen25-dinosiglip-224px is not a "
                                             r"mergevla base directory \(write one with python vla-scripts/convert_base\.py"):
        build_vla("qwen25-dinosiglip-224px", BaseModelConfig(base_dir=where))


def test_qwen_dir_of_another_size_is_refused(qwen_dir, tmp_path):
    d, _ = qwen_dir
    with pytest.raises(BaseModelError, match=r"config\.json: hidden_size is 128, config 'tiny' expects 64"):
        build_vla(get_config("tiny", llm=type(CFG.llm)(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                                          intermediate_size=384, vocab_size=512)),
                  BaseModelConfig(llm_path=d))


@pytest.mark.parametrize("key, value, message", [
    ("rope_theta", 1e6, "rope_theta is 1000000.0, config 'tiny' expects 10000.0"),  # the older, flat form
    ("rope_parameters", {"rope_type": "default", "rope_theta": 5e5}, "rope_theta is 500000.0, config 'tiny' expects"),
    ("rms_norm_eps", 1e-5, "rms_norm_eps is 1e-05, config 'tiny' expects 1e-06"),
    ("tie_word_embeddings", False, "tie_word_embeddings is False, config 'tiny' expects True"),
])
def test_qwen_dir_whose_config_states_other_settings_is_refused(qwen_dir, tmp_path, key, value, message):
    d = tmp_path / "qwen"
    shutil.copytree(qwen_dir[0], d)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**hf, key: value}))
    with pytest.raises(BaseModelError, match=re.escape(message)):
        build_vla(CFG, BaseModelConfig(llm_path=d, random_seed=0))


def test_tampered_base_dir_is_refused(tmp_path):
    """base.json's sha256 is the base's identity in manifests: weights changed under it must not load silently."""
    save_base_dir(tmp_path / "base", CFG, random_base(CFG, 0), build_tiny_tokenizer().to_str())
    save_pretrained(build_vla(CFG, BaseModelConfig(base_dir=tmp_path / "base")), tmp_path / "ckpt")
    wf = tmp_path / "base" / "vlm.safetensors"
    sd = load_file(str(wf))
    sd["projector.0.bias"] = sd["projector.0.bias"] + 1
    save_file(sd, str(wf))
    with pytest.raises(BaseModelError, match=r"base/vlm\.safetensors does not match the sha256 recorded in "
                                             r".*base/base\.json: the file is corrupt or was changed"):
        from_pretrained(tmp_path / "ckpt")
    got, _ = load_base_dir(tmp_path / "base", CFG, verify=False)  # opting out reads it as it is
    assert torch.equal(got["projector.0.bias"], sd["projector.0.bias"])


def test_unreadable_weight_files_are_named(qwen_dir, tmp_path):
    d, _ = qwen_dir
    broken = tmp_path / "qwen"
    shutil.copytree(d, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(BaseModelError, match=r"qwen/model\.safetensors: cannot be read as Qwen2 weights "
                                             r"\(SafetensorError"):
        build_vla(CFG, BaseModelConfig(llm_path=broken, random_seed=0))
    save_base_dir(tmp_path / "base", CFG, random_base(CFG, 0), build_tiny_tokenizer().to_str())
    (tmp_path / "base" / "vlm.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BaseModelError, match=r"base/vlm\.safetensors: cannot be read as the VLM weights"):
        load_base_dir(tmp_path / "base", CFG)


@pytest.mark.parametrize("damage, says", [
    (lambda meta: "{not json", r"base\.json is not valid JSON"),
    (lambda meta: "[1, 2]", r"base\.json does not hold a JSON object \(found list\)"),
    (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "config"}), r"field 'config' is missing"),
    (lambda meta: json.dumps({**meta, "config": {**meta["config"], "llm": {**meta["config"]["llm"], "bogus": 1}}}),
     r"field 'config' is missing or invalid \(unknown LLMConfig fields \['bogus'\] in 'llm'"),
    (lambda meta: json.dumps({**meta, "config": {**meta["config"], "llm": "x"}}),
     r"VLAConfig field 'llm' is 'x', expected an object of LLMConfig fields"),
])
def test_a_damaged_base_json_is_named_with_what_is_wrong(tmp_path, damage, says):
    save_base_dir(tmp_path / "base", CFG, random_base(CFG, 0), build_tiny_tokenizer().to_str())
    meta_file = tmp_path / "base" / "base.json"
    meta_file.write_text(damage(json.loads(meta_file.read_text())))
    with pytest.raises(BaseModelError, match=says):
        load_base_dir(tmp_path / "base", CFG)


def test_a_damaged_tokenizer_in_a_base_dir_is_named(tmp_path):
    save_base_dir(tmp_path / "base", CFG, random_base(CFG, 0), build_tiny_tokenizer().to_str())
    (tmp_path / "base" / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(BaseModelError, match=r"base/tokenizer\.json is not a tokenizer file the tokenizers library "
                                             r"can read \(EOF while parsing"):
        build_vla(CFG, BaseModelConfig(base_dir=tmp_path / "base"))


# ----------------------------------------------------------------------------- settings no shape reveals


def test_a_base_dir_for_another_llm_setting_is_refused(tmp_path):
    """Settings that change no shape (here the LLM's rope_theta) must match too: the weights would load and run wrong."""
    other = get_config("tiny", llm=dataclasses.replace(CFG.llm, rope_theta=5e5))
    save_base_dir(tmp_path / "base", other, random_base(other, 0), build_tiny_tokenizer().to_str())
    with pytest.raises(BaseModelError, match=r"base\.json: config field 'llm' is .*rope_theta=500000\.0.*, but the "
                                             r"model config 'tiny' expects .*rope_theta=10000\.0"):
        load_base_dir(tmp_path / "base", CFG)


def test_a_files_base_reference_rebuilds_the_same_base(qwen_dir):
    """from_pretrained rebuilds θ0 from the manifest's reference: every part of it (the seed too) must survive."""
    d, _ = qwen_dir
    _, ref, _ = resolve_base(CFG, BaseModelConfig(llm_path=d, random_seed=3))
    again = base_config_from_ref(ref)
    assert again == BaseModelConfig(llm_path=d.resolve(), random_seed=3)
    assert resolve_base(CFG, again)[1]["sha256"] == ref["sha256"]


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                 "intermediate_size", "vocab_size"])
def test_qwen_dir_of_another_shape_is_refused_by_name(qwen_dir, tmp_path, key):
    """Each size field is checked before any weight is read (a shape error deep in load_state_dict names nothing)."""
    d = tmp_path / "qwen"
    shutil.copytree(qwen_dir[0], d)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**hf, key: hf[key] * 2}))
    with pytest.raises(BaseModelError, match=rf"config\.json: {key} is {hf[key] * 2}, config 'tiny' expects {hf[key]}"):
        resolve_base(CFG, BaseModelConfig(llm_path=d, random_seed=0))


def test_llm_path_alone_asks_for_the_other_parts(qwen_dir):
    with pytest.raises(BaseModelError, match="llm_path alone leaves the vision towers and projector unset: add "
                                             "prismatic_checkpoint"):
        resolve_base(CFG, BaseModelConfig(llm_path=qwen_dir[0]))


def test_a_base_json_of_another_format_is_refused(tmp_path):
    save_base_dir(tmp_path / "base", CFG, random_base(CFG, 0), build_tiny_tokenizer().to_str())
    meta_file = tmp_path / "base" / "base.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "format": "mergevla-checkpoint"}))
    with pytest.raises(BaseModelError, match=r"base\.json: field 'format' is 'mergevla-checkpoint', expected "
                                             r"'mergevla-base'"):
        load_base_dir(tmp_path / "base", CFG)


def test_save_base_dir_never_overwrites_a_base(tmp_path):
    save_base_dir(tmp_path / "base", CFG, random_base(CFG, 0), build_tiny_tokenizer().to_str())
    before = (tmp_path / "base" / "base.json").read_text()
    with pytest.raises(FileExistsError, match=r"base already holds base\.json, vlm\.safetensors, tokenizer\.json; "
                                              r"refusing to overwrite it"):
        save_base_dir(tmp_path / "base", CFG, random_base(CFG, 1), build_tiny_tokenizer().to_str())
    assert (tmp_path / "base" / "base.json").read_text() == before
