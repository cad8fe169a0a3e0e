"""Our model against independent implementations of the same architecture, on the same synthetic weights (fp32):
``diffusers``' ``WanTransformer3DModel`` and ``AutoencoderKLWan``, ``transformers``' UMT5, and Wan's own T5
computation written out from its published definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from transformers import UMT5EncoderModel

from services.gpu_worker.model import WanStreamingModel, get_config
from services.gpu_worker.model import checkpoint_files as files
from services.gpu_worker.model.loader import umt5_config
from services.gpu_worker.model.synth import synthetic_networks
from tests.synthetic_models import load_tiny, tiny_model_dir

CONFIG = get_config("tiny")
PROMPT = "A red fox,  running &amp; jumping through snow"


@pytest.mark.parametrize("timestep", [1000.0, 937.5, 625.0])
def test_our_dit_on_a_first_chunk_equals_diffusers_wan_transformer(timestep: float) -> None:
    model = load_tiny(max_sessions=1)
    d = CONFIG.dit
    reference = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=d.num_heads, attention_head_dim=d.head_dim, in_channels=d.in_dim,
        out_channels=d.out_dim, text_dim=d.text_dim, freq_dim=d.freq_dim, ffn_dim=d.ffn_dim, num_layers=d.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=d.eps,
    ).eval()
    published = {key: value.clone() for key, value in model.dit.state_dict().items()}
    reference.load_state_dict(convert_wan_transformer_to_diffusers(published), strict=True)  # the library's own
    handle = model.new_session("s", PROMPT, 0)
    context = model.text.encode(PROMPT)  # zero-padded to text_len, as the Wan pipelines pass it
    s = CONFIG.stream
    latents = torch.randn(1, d.in_dim, s.frames_per_chunk, s.latent_height, s.latent_width,
                          generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(latents, timestep=torch.tensor([timestep]), encoder_hidden_states=context[None],
                             return_dict=False)[0]
        ours = model.dit(latents, timestep, model._chunk_batch([model._session(handle)]), model.pools)
    assert ours is not None
    # fp32 agrees to ~3e-6 of values around 0.45; exact GELU instead of tanh-GELU alone would be off by ~1e-4
    assert (ours - expected).abs().max().item() < 2e-5


def _recording_decode(model: WanStreamingModel, seen: list[torch.Tensor]) -> None:
    decode = model.vae.decode

    def record(latents: torch.Tensor, caches: list[object]) -> object:
        seen.append(latents.clone())
        return decode(latents, caches)  # type: ignore[arg-type]

    model.vae.decode = record  # type: ignore[method-assign]


def test_streamed_chunks_with_state_moved_between_models_equal_one_diffusers_decode_of_the_whole_video() -> None:
    latents: list[torch.Tensor] = []
    frames = []
    state = None
    for chunk in range(4):  # every chunk on a fresh model, the session carried by export_state / import_state
        model = load_tiny(max_sessions=1)
        _recording_decode(model, latents)
        handle = model.new_session("s", PROMPT, 7) if state is None else model.import_state("s", state)
        frames.append(model.generate([handle])[0].frames)
        state = {name: tensor.clone() for name, tensor in model.export_state(handle).items()}
        assert chunk == 0 or any(name.startswith("vae_cache.") for name in state)
    vae = load_tiny().vae.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.inference_mode():
        video = vae.decode(torch.cat(latents, dim=2) * std + mean).sample  # [1, 3, T, H, W] in [-1, 1]
    expected = ((video[0] + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    streamed = torch.cat(frames)
    assert streamed.shape == expected.shape == (9 + 3 * 12, CONFIG.height_px, CONFIG.width_px, 3)
    assert (streamed.int() - expected.int()).abs().max().item() <= 1  # fp32 conv algorithms differ by layout


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * weight


def _relative_buckets(length: int, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Wan's bidirectional T5 relative-position bucket of key j for query i."""
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    large = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return buckets + torch.where(distance < exact, distance, large.clamp(max=half - 1))


def _wan_t5_encoder(state: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, heads: int,
                    layers: int) -> torch.Tensor:
    """Wan's ``T5Encoder`` forward on its own key layout: unscaled attention with a per-block relative bias,
    GELU-gated FFN (gate * fc1), RMS norms."""
    x = state["token_embedding.weight"][ids].float()
    length = ids.shape[1]
    buckets = _relative_buckets(length)
    for i in range(layers):
        w = {key.removeprefix(f"blocks.{i}."): value.float() for key, value in state.items()
             if key.startswith(f"blocks.{i}.")}
        h = _rms(x, w["norm1.weight"])
        q, k, v = (F.linear(h, w[f"attn.{n}.weight"]).unflatten(-1, (heads, -1)) for n in "qkv")
        scores = torch.einsum("binc,bjnc->bnij", q, k) + w["pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        attended = torch.einsum("bnij,bjnc->binc", scores.softmax(dim=-1), v).flatten(2)
        x = x + F.linear(attended, w["attn.o.weight"])
        h = _rms(x, w["norm2.weight"])
        gated = F.linear(h, w["ffn.fc1.weight"]) * F.gelu(F.linear(h, w["ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(gated, w["ffn.fc2.weight"])
    return _rms(x, state["norm.weight"].float())


def test_our_text_path_equals_transformers_umt5_and_wans_own_t5_on_the_same_weights() -> None:
    text = load_tiny().text
    ours = text.encode(PROMPT)
    ids, mask = text.tokenize(PROMPT)
    length = int(mask.sum())
    assert 1 < length < CONFIG.dit.text_len and torch.equal(ours[length:], torch.zeros_like(ours[length:]))

    wan_layout = torch.load(tiny_model_dir() / files.T5_FILES[0], weights_only=True)
    t = CONFIG.text_encoder
    wan = _wan_t5_encoder(wan_layout, ids, mask, t.num_heads, t.num_layers)[0, :length]
    assert (ours[:length] - wan).abs().max().item() < 1e-4

    _, _, seeded = synthetic_networks(CONFIG)  # the encoder the synthetic file was written from, never remapped
    library = UMT5EncoderModel(umt5_config(t)).eval()
    library.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in seeded.state_dict().items()})
    with torch.inference_mode():
        hidden = library(input_ids=ids, attention_mask=mask).last_hidden_state[0, :length]
    assert (ours[:length] - hidden).abs().max().item() < 1e-4


def test_a_prompt_is_encoded_once_however_many_sessions_share_it() -> None:
    model = load_tiny(max_sessions=4)
    before = model.text.encoded
    for i in range(3):
        model.new_session(f"s{i}", "one shared prompt for everybody", i)
    assert model.text.encoded - before <= 1


def test_a_chunk_does_not_change_when_the_next_one_is_generated_differently() -> None:
    steady, diverging = load_tiny(max_sessions=1), load_tiny(max_sessions=1)
    a, b = steady.new_session("s", PROMPT, 5), diverging.new_session("s", PROMPT, 5)
    for _ in range(3):
        assert torch.equal(steady.generate([a])[0].frames, diverging.generate([b])[0].frames)
    diverging.set_prompt(b, "a completely different prompt about the ocean at night")
    same_past = steady.export_state(a), diverging.export_state(b)
    assert torch.equal(same_past[0]["kv"], same_past[1]["kv"])
    later = [(steady.generate([a])[0].frames.float() - diverging.generate([b])[0].frames.float()).abs().mean()
             for _ in range(2)]
    assert later[-1] > 1.0  # the divergence is real, and it only ever shows after the chunk it started at
