"""``multixent.transformers.apply``: tiny transformers causal LMs (from configs, no downloads) patched
and unpatched give the same losses, gradients, trained parameters and generated tokens.

The oracle is the unpatched model itself (transformers' ``ForCausalLMLoss`` over its full logits),
a deep copy of the same initial weights. Gradients compare per tensor within 1e-5 of the
reference's norm: ``|g' - g| <= 1e-5 |g|``. (AdamW's normalised steps amplify float32 rounding:
the first step's gradients agree within 1e-6 of their largest entry; after five steps at lr=1e-2
some tensors differ by 5e-5 of their norm, at lr=1e-3 by 3.5e-6.) Runs with the torch backend.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
from _paths import ROOT
from conftest import SELECTED

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mt = pytest.importorskip("multixent.transformers")

pytestmark = pytest.mark.skipif("torch" not in SELECTED, reason="the torch backend is not selected")

V = 256
SMALL = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, **HEADS, **TOKENS, head_dim=8),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, **HEADS, **TOKENS, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, **HEADS, **TOKENS, head_dim=8),
    # a small cap, so that it changes the loss of these small logits
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL,
        **HEADS,
        **TOKENS,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=8,
        final_logit_softcapping=2.0,
        initializer_range=0.5,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        **TOKENS,
    ),
    "phi3": lambda: transformers.Phi3Config(**SMALL, **HEADS, **TOKENS, resid_pdrop=0, embd_pdrop=0),
    "phi": lambda: transformers.PhiConfig(**SMALL, **HEADS, **TOKENS, resid_pdrop=0, embd_pdrop=0),  # lm_head bias
}


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    if name == "phi":
        assert model.get_output_embeddings().bias is not None
    return model


def _batch(step: int, batch: int = 3, length: int = 12):
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(3, V, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, : step % 4] = 0  # left padding, a different amount per step
    labels = ids.masked_fill(mask == 0, -100)
    labels[-1, 5 : 5 + step % 3] = -100
    return ids, mask, labels


def _close(actual, expected, what: str, rtol: float = 1e-5) -> None:
    """``|actual - expected| <= rtol |expected|`` (Euclidean norms: a tensor's relative error)."""
    error = (actual.detach() - expected.detach()).norm().item()
    assert error <= rtol * expected.detach().norm().item(), f"{what}: relative error {error / expected.norm():.2e}"


@pytest.mark.parametrize("name", CONFIGS)
def test_five_adamw_steps_equal_the_unpatched_model(name):
    reference = _model(name)
    patched = mt.apply(copy.deepcopy(reference), chunk_size=8)  # 36 rows: five chunks, the last of 4
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (reference, patched)]
    for step in range(5):
        ids, mask, labels = _batch(step)
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
        out = patched(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None
        _close(out.loss, expected.loss, f"{name} step {step} loss")
        expected.loss.backward()
        out.loss.backward()
        for (key, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
            _close(p.grad, q.grad, f"{name} step {step} {key}.grad")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()


def test_gemma2_softcap_is_applied():
    # the patched loss equals the capped one and differs from the uncapped one
    model = _model("gemma2")
    ids, mask, labels = _batch(1)
    patched = mt.apply(copy.deepcopy(model))
    loss = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.config.final_logit_softcapping = None
    uncapped = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    _close(loss, patched.__class__.forward(patched, input_ids=ids, attention_mask=mask, labels=labels).loss, "cap")
    assert abs(loss.item() - uncapped.item()) > 0.1 * loss.item()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_loss_options_equal_the_unpatched_model(name):
    reference = _model(name)
    patched = mt.apply(copy.deepcopy(reference))
    ids, mask, labels = _batch(2)
    kw = {"input_ids": ids, "attention_mask": mask}
    count = torch.tensor(7)  # the Trainer's num_items_in_batch: the loss is the sum over it
    _close(
        patched(**kw, labels=labels, num_items_in_batch=count).loss,
        reference(**kw, labels=labels, num_items_in_batch=count).loss,
        "num_items_in_batch",
    )
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    _close(patched(**kw, shift_labels=shifted).loss, reference(**kw, labels=labels).loss, "shift_labels")
    # logits_to_keep: the loss over the kept positions, with their shift_labels
    kept = {"labels": labels, "shift_labels": shifted[:, -4:].contiguous(), "logits_to_keep": 4}
    _close(patched(**kw, **kept).loss, reference(**kw, **kept).loss, "logits_to_keep")
    with pytest.raises(ValueError, match="36 shifted labels for 12 hidden states"):
        patched(**kw, labels=labels, logits_to_keep=4)
    as_tuple = patched(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    _close(as_tuple[0], reference(**kw, labels=labels).loss, "return_dict=False")
    # without labels: the model's own logits
    torch.testing.assert_close(patched(**kw).logits, reference(**kw).logits, rtol=0, atol=0)
    # with return_logits=True: the logits besides the loss
    mt.apply(patched, return_logits=True)
    out, expected = patched(**kw, labels=labels), reference(**kw, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    _close(out.loss, expected.loss, "return_logits loss")


def test_bfloat16_model_gives_a_float32_loss():
    reference = _model("llama").to(torch.bfloat16)
    patched = mt.apply(copy.deepcopy(reference))
    ids, mask, labels = _batch(1)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.loss.dtype == expected.loss.dtype == torch.float32
    # transformers rounds the logits to bfloat16 first; multixent computes them in float32
    _close(out.loss, expected.loss, "bfloat16 loss", rtol=1e-2)
    out.loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in patched.parameters())


def test_the_patched_forward_keeps_its_signature_and_survives_deepcopy():
    import inspect

    model = _model("llama")
    before = inspect.signature(model.forward)
    mt.apply(model)
    assert inspect.signature(model.forward) == before
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    ids, _, labels = _batch(0)
    assert twin(input_ids=ids, labels=labels).logits is None


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_gives_the_same_tokens(name):
    reference = _model(name)
    patched = mt.apply(copy.deepcopy(reference))
    ids, mask, _ = _batch(3, batch=2, length=6)
    kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    expected = reference.generate(ids, **kw)
    assert expected.shape[1] > ids.shape[1]
    assert torch.equal(patched.generate(ids, **kw), expected)


def _train(model, tmp_path, steps: int = 2):
    # SGD: the parameters' changes are the summed gradients' (AdamW's normalised steps amplify float32
    # rounding in near-zero gradient entries: its trained parameters differ by up to 2e-4 of their norm)
    ids, mask, labels = zip(*(_batch(s, batch=1, length=10) for s in range(8)), strict=True)
    data = [
        {"input_ids": i[0], "attention_mask": m[0], "labels": y[0]} for i, m, y in zip(ids, mask, labels, strict=True)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=0.5,
        optim="sgd",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the loss
    trainer.train()
    return model


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_trainer_with_gradient_accumulation_trains_the_same_parameters(name, tmp_path):
    initial = _model(name)
    reference = _train(copy.deepcopy(initial), tmp_path / "reference")
    patched = _train(mt.apply(copy.deepcopy(initial)), tmp_path / "patched")
    for (key, p), q, p0 in zip(patched.named_parameters(), reference.parameters(), initial.parameters(), strict=True):
        _close(p, q, f"{name} trained {key}")
        _close(p - p0, q - p0, f"{name} {key}'s change")
    head, head0 = reference.get_output_embeddings().weight, initial.get_output_embeddings().weight
    assert (head - head0).norm() > 1e-2 * head0.norm()


def test_restore_gives_back_the_model():
    model = _model("llama")
    ids, _, labels = _batch(0)
    expected = model(input_ids=ids, labels=labels)
    assert mt.apply(model) is model
    assert "forward" in vars(model)
    mt.apply(model)  # again: replaces the options, one patch
    assert mt.restore(model) is model
    assert "forward" not in vars(model)
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    assert mt.restore(model) is model  # a model not patched: as is


def test_restore_keeps_a_forward_patched_before():
    model = _model("llama")
    calls = []
    original = model.forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = spy
    mt.apply(model)
    ids, _, labels = _batch(0)
    assert model(input_ids=ids, labels=labels).logits is None
    assert calls == [1]
    mt.restore(model)
    assert model.forward is spy


def test_unsupported_models_raise_naming_the_class():
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(TypeError, match="BertForMaskedLM"):
        mt.apply(bert)
    with pytest.raises(TypeError, match="Linear"):
        mt.apply(torch.nn.Linear(3, 4))
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, **HEADS, **TOKENS))
    with pytest.raises(ValueError, match=r"CohereForCausalLM has config\.logit_scale"):
        mt.apply(cohere)
    assert "forward" not in vars(bert) and "forward" not in vars(cohere)
    llama = _model("llama")
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1; got 0"):
        mt.apply(llama, chunk_size=0)
    with pytest.raises(TypeError, match="return_logits must be a bool; got 'yes'"):
        mt.apply(llama, return_logits="yes")
    assert "forward" not in vars(llama)


def test_a_forward_that_skips_the_output_embeddings_raises():
    model = mt.apply(_model("llama"))
    model.get_output_embeddings = lambda: torch.nn.Linear(32, V)  # a head the forward never calls
    ids, _, labels = _batch(0)
    with pytest.raises(TypeError, match=r"LlamaForCausalLM\.forward called its output embeddings 0 times"):
        model(input_ids=ids, labels=labels)


# --------------------------------------------------------------------------
# docs/language-models.md: every ```python block runs as written

DOC = ROOT / "docs" / "language-models.md"
DOC_BLOCKS = [
    (DOC.read_text().count("\n", 0, m.start()) + 2, m.group(1))
    for m in re.finditer(r"^```python\n(.*?)^```", DOC.read_text() if DOC.exists() else "", re.M | re.S)
]


@pytest.mark.parametrize(("line", "code"), DOC_BLOCKS, ids=[f"language-models.md:{n}" for n, _ in DOC_BLOCKS])
def test_docs_block_runs(line, code, tmp_path):
    if code.startswith("# not run"):
        pytest.skip("marked '# not run'")
    if re.search(r"^\s*(import|from) (jax|flax|optax)\b", code, re.M):
        if "jax" not in SELECTED:
            pytest.skip("the jax backend is not selected")
        pytest.importorskip("flax.nnx")
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{DOC.name}:{line}\n{done.stdout}\n{done.stderr}"
