"""lightllm.models.GPT: both families against transformers (logits by the tolerance rule, greedy
tokens exactly), generation with and without the cache, per-sequence EOS, sampling controls, bad
input, training against the eager reference, and the lightllm ops counted."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA

from lightllm import _dispatch
from lightllm.models import GPT, ByteTokenizer, GPTConfig
from lightllm.testing import DispatchedOps, assert_parity, reference_backend

transformers = pytest.importorskip("transformers")


def _hf_gpt2(layers=2):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=211, n_positions=96, n_embd=48, n_layer=layers,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).to(DEVICE).eval()


def _hf_llama(layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=193, hidden_size=72, intermediate_size=100,
                                      num_hidden_layers=layers, num_attention_heads=9,
                                      num_key_value_heads=3, max_position_embeddings=96,
                                      rope_theta=500.0)
    return transformers.LlamaForCausalLM(config).to(DEVICE).eval()


def _hf_mistral(layers=3, window=8):
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=151, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=128,
                                        sliding_window=window, rope_theta=500.0)
    return transformers.MistralForCausalLM(config).to(DEVICE).eval()


FAMILIES = {"gpt2": _hf_gpt2, "llama": _hf_llama}


def _left_padded(vocab, lengths, seq):
    ids = torch.randint(3, vocab, (len(lengths), seq), device=DEVICE)
    mask = torch.ones(len(lengths), seq, dtype=torch.long, device=DEVICE)
    for i, n in enumerate(lengths):
        mask[i, :seq - n] = 0
        ids[i, :seq - n] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------------
# Against transformers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_shares_weights_and_matches_logits(family):
    hf = FAMILIES[family]()
    model = GPT.from_hf(hf)
    hf_storages = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert all(p.untyped_storage().data_ptr() in hf_storages for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    ids, mask = _left_padded(hf.config.vocab_size, [13, 9, 2], 13)
    with DispatchedOps() as ops:
        logits = model(ids, attention_mask=mask)
    # transformers' forward numbers positions 0.. across the padding; generate and lightllm's
    # GPT number each sequence from its first real token.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = hf(ids, attention_mask=mask, position_ids=positions).logits
    want64 = copy.deepcopy(hf).double()(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_parity(logits[real], want64[real], want[real])
    layers = hf.config.num_hidden_layers
    assert ops.lightllm["sdpa_fwd"] == layers
    norm = "add_layer_norm_fwd" if family == "gpt2" else "add_rms_norm_fwd"
    assert ops.lightllm[norm] == 2 * layers  # after attention, and into the next norm
    mlp = "feed_forward_fwd" if family == "gpt2" else "swiglu_feed_forward_fwd"
    assert ops.lightllm[mlp] == layers
    if family == "llama":
        assert ops.lightllm["rotary_embedding"] == layers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_equals_transformers(family):
    hf = FAMILIES[family]()
    model = GPT.from_hf(hf)
    prompt = torch.randint(3, hf.config.vocab_size, (1, 7), device=DEVICE)
    want = hf.generate(prompt, max_new_tokens=9, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, 9), want)
    ids, mask = _left_padded(hf.config.vocab_size, [8, 5, 1], 8)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                       pad_token_id=0)
    with DispatchedOps() as ops:
        got = model.generate(ids, 9, attention_mask=mask)
    assert torch.equal(got, want)
    # The padding is never attended: one packed prefill (varlen), 8 steps over the paged cache.
    layers = hf.config.num_hidden_layers
    assert ops.lightllm["sdpa_fwd"] == 0
    assert ops.lightllm["varlen_fwd"] == layers
    assert ops.lightllm["attention_kvcache"] == layers * 8


@pytest.mark.parametrize("native", [True, False], ids=["native", "kernels"])
def test_sliding_window_generates_past_it_like_transformers(native):
    """Mistral's local attention: logits of a prompt longer than the window, and greedy tokens
    to 3x the window (the static cache, and a left-padded batch) equal transformers'."""
    if native and DEVICE != "cpu":
        pytest.skip("the native CPU path")
    window = 8
    hf = _hf_mistral(layers=3 if native else 2, window=window)
    model = GPT.from_hf(hf)
    assert model.config.sliding_window == window and model.context_length == 128
    route = _dispatch.native_cpu if native else contextlib.nullcontext
    long = torch.randint(3, 151, (1, 3 * window + 5 if native else 2 * window + 3), device=DEVICE)
    with torch.no_grad(), route(), DispatchedOps() as ops:
        logits = model(long)
    if not native:  # the windowed prefill ran lightllm's attention kernel in every layer
        assert ops.lightllm["sdpa_fwd"] == hf.config.num_hidden_layers, ops.lightllm
    want = hf(long).logits
    want64 = copy.deepcopy(hf).double()(long).logits
    assert_parity(logits, want64, want)
    prompt = long[:, :window + 4] if native else long[:, :5]
    n, eos = 3 * window, hf.generation_config.eos_token_id
    want = hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    with route():
        assert torch.equal(model.generate(prompt, n, eos_token_id=eos, pad_token_id=0), want)
    if native:
        ids, mask = _left_padded(151, [window + 5, 3, 1], window + 5)
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        assert want.shape[1] == ids.shape[1] + n
        with route():
            got = model.generate(ids, n, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, want)


@_dispatch.native_cpu()  # the cache's bookkeeping is the model's; the kernels' parity is above
def test_generation_with_cache_equals_recomputing():
    model = GPT.from_hf(_hf_llama())
    prompt = torch.randint(3, 193, (2, 5), device=DEVICE)
    got = model.generate(prompt, 8)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids)


@_dispatch.native_cpu()  # stopping is the model's logic: the kernels' parity is checked above
def test_each_sequence_stops_at_its_eos():
    model = GPT.from_hf(_hf_gpt2())
    prompt = torch.randint(3, 211, (2, 4), device=DEVICE)
    free = model.generate(prompt, 10)
    eos = int(free[0, 4 + 2])  # sequence 0's third new token
    assert eos not in free[1, 4:].tolist(), "pick another seed: both sequences would stop"
    got = model.generate(prompt, 10, eos_token_id=eos, pad_token_id=7)
    first = (free[0, 4:] == eos).nonzero()[0, 0].item()
    assert torch.equal(got[0, :4 + first + 1], free[0, :4 + first + 1])
    assert (got[0, 4 + first + 1:] == 7).all()  # finished: padded
    assert torch.equal(got[1], free[1])  # the other one went on
    both = model.generate(prompt[:1], 10, eos_token_id=eos)
    assert both.shape[1] == 4 + first + 1  # all finished: generation ends


@_dispatch.native_cpu()  # sampling is the model's logic: the kernels' parity is checked above
def test_sampling_controls():
    model = GPT.from_hf(_hf_llama())
    prompt = torch.randint(3, 193, (2, 5), device=DEVICE)
    greedy = model.generate(prompt, 6)
    assert torch.equal(model.generate(prompt, 6, temperature=0.8, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 6, temperature=0.8, top_p=1e-6), greedy)
    draws = [model.generate(prompt, 6, temperature=1.5,
                            generator=torch.Generator(DEVICE).manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    streamed = []
    out = model.generate(prompt, 6, stream=streamed.append)
    assert torch.equal(torch.stack(streamed, 1), out[:, 5:])
    assert torch.equal(torch.stack(list(model.generate_iter(prompt, 6)), 1), out[:, 5:])


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), 4), "prompt is empty"),
    (lambda m: m.generate(torch.tensor([[5, 999]]), 4), r"token ids must lie in \[0, 211\)"),
    (lambda m: m.generate(torch.tensor([[-1, 3]]), 4), "token ids must lie"),
    (lambda m: m.generate(torch.tensor([[5, 6]]), 95), "exceed the model's context of 96"),
    (lambda m: m.generate(torch.tensor([[5, 6]]), 4, top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (lambda m: m.generate(torch.tensor([[5, 6]]), 4, top_p=1.5), "top_p"),
    (lambda m: m.generate(torch.tensor([[5, 6]]), 4, temperature=-1.0), "temperature"),
    (lambda m: m.generate(torch.tensor([[5, 6]]), 4, top_k=0), "top_k"),
    (lambda m: m.generate(torch.tensor([5, 6]), 4), "input_ids must be a"),
])
def test_bad_generate_inputs(call, match):
    model = GPT.from_hf(_hf_gpt2()).cpu()
    with pytest.raises(ValueError, match=match):
        call(model)


def test_unsupported_architecture():
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64)
    with pytest.raises(ValueError, match="unsupported architecture BertModel"):
        GPT.from_hf(transformers.BertModel(config))


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(n_head=9, n_kv_head=4)
    with pytest.raises(ValueError, match="mlp must be one of"):
        GPTConfig(mlp="geglu")
    with pytest.raises(ValueError, match="backend must be one of"):
        GPT(GPTConfig.gpt2(vocab_size=11, n_layer=1, n_head=2, n_embd=8), backend="eager")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reference_backend_runs_no_lightllm_op(family):
    """The oracle of the convergence test and the benchmarks' "eager" provider is the same model
    on backend="reference": no lightllm op may run there (else that comparison checks nothing),
    every op family runs on "lightllm", and switching back restores it."""
    make = GPTConfig.gpt2 if family == "gpt2" else GPTConfig.llama
    model = GPT(make(vocab_size=53, n_layer=2, n_head=4, n_kv_head=2 if family == "llama" else None,
                     n_embd=32, intermediate_size=48, block_size=32)).to(DEVICE)
    ids = torch.randint(0, 53, (2, 7), device=DEVICE)
    with torch.no_grad(), DispatchedOps() as ours:
        want = model(ids)
    with torch.no_grad(), reference_backend(model), DispatchedOps() as theirs:
        got = model(ids)
    assert not theirs.lightllm, theirs.lightllm
    assert all(block.attn.backend == "lightllm" for block in model.blocks)
    assert ours.lightllm["sdpa_fwd"] == 2 and ours.lightllm[
        "swiglu_feed_forward_fwd" if family == "llama" else "feed_forward_fwd"] == 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Training through the model: lightllm's kernels against the eager reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, steps, native", [
    ("gpt2", 30, True), ("llama", 30, True),
    # The Triton kernels themselves (the interpreter on a CPU machine: ~6 s a step).
    ("llama", 4 if DEVICE == "cpu" else 30, False),
], ids=["gpt2-native", "llama-native", "llama-kernels"])
def test_training_converges_like_the_eager_reference(family, steps, native):
    """A tiny byte-level GPT trained from one seed: per-step losses and the final parameters of
    lightllm's ops and of the eager reference agree (Liger-Kernel's check). "native": lightllm's
    CPU path (its C++ kernels, PyTorch's ops behind its checks), as a CPU user trains."""
    if native and DEVICE != "cpu":
        pytest.skip("the native CPU path")
    tok = ByteTokenizer()
    text = ("<USER>What is the capital of France?<ASSISTANT>Paris.<EOS>"
            "<USER>What is two plus two?<ASSISTANT>Four.<EOS>") * 3
    data = torch.tensor(tok.encode(text), device=DEVICE)
    make = GPTConfig.gpt2 if family == "gpt2" else GPTConfig.llama
    config = make(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2 if family ==
                  "llama" else None, n_embd=32, intermediate_size=64, block_size=64,
                  rope_base=10000.0)
    torch.manual_seed(0)
    ours = GPT(config).to(DEVICE)
    theirs = copy.deepcopy(ours)
    # The interpreter runs one program per (position, head block) of the rotary kernel: keep the
    # kernels' case small.
    rows, seq = (4, 32) if native or DEVICE != "cpu" else (2, 12)
    runs = []
    ours_route = _dispatch.native_cpu if native else contextlib.nullcontext
    for model, route in ((ours, ours_route), (theirs, lambda: reference_backend(theirs))):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        with route():
            for _ in range(steps):
                starts = torch.randint(0, len(data) - seq - 1, (rows,), generator=g)
                batch = torch.stack([data[s:s + seq + 1] for s in starts])
                logits = model(batch[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        runs.append(losses)
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), atol=1e-4, rtol=1e-4)
    if steps >= 30:
        assert runs[0][-1] < 0.6 * runs[0][0]  # it learned
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if name.endswith("k_proj.bias"):
            # Softmax ignores a bias added to every key: its true gradient is 0, so both runs
            # follow rounding noise, which Adam scales up to full-size steps.
            continue
        torch.testing.assert_close(p, q, atol=2e-4, rtol=2e-4, msg=name)


# ------------------------------------------------------------------------------------------------
# The pretrained SmolLM2-135M-Instruct
# ------------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("smollm2")
def test_smollm2_greedy_tokens_equal_transformers(smollm2):
    """Token for token, float32: one prompt and a left-padded batch. On the native CPU path on
    a CPU machine (the tiny models above run the Triton kernels), the Triton kernels on a GPU."""
    tok, hf = smollm2
    model = GPT.from_hf(hf.to(DEVICE))
    chats = ["What is the capital of France?", "Name a colour."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                       add_generation_prompt=True) for c in chats]
    def route():
        return _dispatch.native_cpu() if DEVICE == "cpu" else contextlib.nullcontext()

    for batch in ([prompts[0]], prompts):
        enc = tok(batch, padding=True, return_tensors="pt", add_special_tokens=False).to(DEVICE)
        want = hf.generate(**enc, max_new_tokens=12, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        with route():
            got = model.generate(enc["input_ids"], 12, attention_mask=enc["attention_mask"],
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert torch.equal(got, want), tok.batch_decode(got[:, enc["input_ids"].shape[1]:])
    assert "Paris" in tok.decode(got[0, enc["input_ids"].shape[1]:])


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager():
    if not HAS_CUDA:
        pytest.skip("needs an NVIDIA GPU")
    model = GPT.from_hf(_hf_llama())
    ids, mask = _left_padded(193, [8, 3], 8)
    eager = model.generate(ids, 10, attention_mask=mask, cuda_graph=False)
    graphed = model.generate(ids, 10, attention_mask=mask, cuda_graph=True)
    assert torch.equal(graphed, eager)
