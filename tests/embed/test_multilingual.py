"""Multilingual text encoders: M-CLIP and sentence-transformers folders give what the reference libraries
give (multilingual-clip and sentence-transformers, run in the clip-retrieval test venv, which installs both),
CLIP models give their text tower, and bad names fail with one line naming the option."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsearch.embed.multilingual import load_text_encoder
from clipsearch.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["un cercle rouge", "ein roter Kreis", "一个红色的圆形", "a red circle on grass", "x"]


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(TEXTS * 3, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", model_max_length=64,
    ).save_pretrained(folder)  # fmt: skip
    _portable_tokenizer_config(folder)


def _portable_tokenizer_config(folder: Path) -> None:
    # transformers 5 names its own backend class; 4.x (the reference venv) knows PreTrainedTokenizerFast
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny XLM-RoBERTa base, an M-CLIP model on it, and a sentence-transformers-layout twin."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    root = tmp_path_factory.mktemp("mling")
    torch.manual_seed(0)
    base = root / "base"
    _tokenizer(base)
    cfg = XLMRobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1)  # fmt: skip
    model = XLMRobertaModel(cfg).eval()
    model.save_pretrained(base, safe_serialization=False)
    mclip = root / "mclip"
    mclip.mkdir()
    for f in base.iterdir():  # one tokenizer for both (BPE training need not give the same merges twice)
        if f.name.startswith(("tokenizer", "special_tokens")):
            (mclip / f.name).write_bytes(f.read_bytes())
    linear = torch.nn.Linear(32, 16)
    state = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    state.update(
        {"LinearTransformation.weight": linear.weight.data, "LinearTransformation.bias": linear.bias.data}
    )
    torch.save(state, mclip / "pytorch_model.bin")
    (mclip / "config.json").write_text(json.dumps({
        "architectures": ["MultilingualCLIP"], "model_type": "M-CLIP", "modelBase": str(base),
        "transformerDimensions": 32, "numDims": 16,
    }))  # fmt: skip
    return {"base": base, "mclip": mclip, "linear": linear, "root": root}


@pytest.fixture(scope="module")
def reference_python() -> str:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install-test-venvs.sh"), "clip-retrieval"],
                         check=True, capture_output=True, text=True, timeout=1800)  # fmt: skip
    return os.path.join(out.stdout.strip().splitlines()[-1], "bin", "python")


# The reference libraries run on the token ids our tokenizer gives (the venv's older tokenizers library reads
# the same tokenizer.json with other ids), so the comparison is of the models' computation.
REFERENCE = r"""
import json, sys
import torch, transformers
from multilingual_clip import pt_multilingual_clip
from sentence_transformers import SentenceTransformer, models
spec = json.loads(sys.stdin.read())
texts = spec["texts"]
enc = {"input_ids": torch.tensor(spec["ids"]), "attention_mask": torch.tensor(spec["mask"])}
tok = lambda txt, **kw: dict(enc)
m = pt_multilingual_clip.MultilingualCLIP.from_pretrained(spec["mclip"]).eval()
with torch.no_grad():
    mclip = m.forward(texts, tok).numpy().tolist()
word = models.Transformer(spec["base"])
pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
dense = models.Dense(32, 16, bias=True, activation_function=torch.nn.Identity())
with torch.no_grad():
    dense.linear.weight.copy_(torch.tensor(spec["w"])); dense.linear.bias.copy_(torch.tensor(spec["b"]))
st = SentenceTransformer(modules=[word, pool, dense, models.Normalize()], device="cpu")
st.save(spec["st"])
with torch.no_grad():
    st_out = st.forward(dict(enc))["sentence_embedding"].numpy().tolist()
print(json.dumps({"mclip": mclip, "st": st_out}))
"""


def test_mclip_and_sentence_transformers_match_the_reference_libraries(folders, reference_python):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["mclip"])
    enc = tok(TEXTS, padding=True)
    raw = Tokenizer.from_file(str(folders["mclip"] / "tokenizer.json"))
    assert [e.ids for e in raw.encode_batch(TEXTS[:1])] == [
        enc["input_ids"][0][: sum(enc["attention_mask"][0])]
    ]
    st_folder = folders["root"] / "st"
    spec = {"texts": TEXTS, "mclip": str(folders["mclip"]), "base": str(folders["base"]), "st": str(st_folder),
            "w": folders["linear"].weight.tolist(), "b": folders["linear"].bias.tolist(),
            "ids": enc["input_ids"], "mask": enc["attention_mask"]}  # fmt: skip
    proc = subprocess.run([reference_python, "-c", REFERENCE], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    ref_mclip = np.asarray(ref["mclip"], np.float32)
    ref_mclip /= np.linalg.norm(ref_mclip, axis=1, keepdims=True)
    ours = load_text_encoder(str(folders["mclip"]))
    assert ours.kind == "m-clip" and ours.dim == 16
    np.testing.assert_allclose(ours.encode_text(TEXTS), ref_mclip, atol=2e-5)
    # batches pad differently: each text's vector does not depend on its neighbours
    np.testing.assert_allclose(ours.encode_text(TEXTS[:1]), ref_mclip[:1], atol=2e-5)
    # the venv's tokenizers re-saves tokenizer.json with other merges: give the saved model our tokenizer back
    for f in folders["base"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (st_folder / f.name).write_bytes(f.read_bytes())
    st = load_text_encoder(str(st_folder))
    assert st.kind == "sentence-transformers"
    np.testing.assert_allclose(st.encode_text(TEXTS), np.asarray(ref["st"], np.float32), atol=2e-5)


def test_mclip_with_inline_transformer_config_loads_offline(folders, tmp_path):
    folder = tmp_path / "inline"
    folder.mkdir()
    for f in folders["mclip"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    base_cfg = json.loads((folders["base"] / "config.json").read_text())
    cfg["modelBase"] = "not-on-the-hub"
    cfg["transformerConfig"] = {k: base_cfg[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                "num_attention_heads", "intermediate_size", "max_position_embeddings", "pad_token_id",
                                "type_vocab_size")}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    a = load_text_encoder(str(folder)).encode_text(TEXTS)
    b = load_text_encoder(str(folders["mclip"])).encode_text(TEXTS)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_clip_models_give_their_text_tower():
    from clipsearch.embed.models import load_clip

    enc = load_text_encoder("clipsearch-tiny")
    assert enc.kind == "clip" and enc.dim == 64
    ref = load_clip("clipsearch-tiny", backend="torch").encode_text(["a red circle"])
    np.testing.assert_allclose(enc.encode_text(["a red circle"]), ref, atol=1e-6)


def test_bad_models_fail_naming_the_option(tmp_path, folders, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("/nonexistent/model", str(tmp_path), "no-such-org/no-such-model"):
        with pytest.raises(ModelLoadError) as e:
            load_text_encoder(name)
        assert "--multilingual-model" in e.value.one_line()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(
        json.dumps({"model_type": "M-CLIP", "modelBase": str(folders["base"])})
    )
    with pytest.raises(ModelLoadError, match="transformerDimensions"):
        load_text_encoder(str(broken))
