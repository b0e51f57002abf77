"""The official training forward (`Bagel.forward` in train mode) on the network inference uses.

Shapes: L=packed tokens, E=LLM hidden, H=query heads, G=kv heads, D=head_dim, V=vocabulary,
P=packed latent channels (64), N=VAE images, C=ViT hidden.

Everything runs through the modules of model/network/ (embeddings, SigLIP and connector, the
timestep embedder, vae2llm / llm2vae, every MoT decoder layer with its two experts, the final
norms, lm_head, the VAE encoder); what is particular to training is how a packed sequence flows
through them:
- the sequence is assembled by index: text and marker embeddings, ViT tokens (each image with
  full attention on its own, then connector + the fixed position table), VAE tokens
  (vae2llm(x_t) + time_embedder(t) + latent position table);
- x0 is the VAE posterior SAMPLE of the zero-padded batch of the pack's images (no gradient), cut
  to each image and patchified; t = sigmoid(raw), shifted t = s*t / (1 + (s-1)*t); x_t = (1-t) x0
  + t noise; clean images have t = 0 (x_t = x0, time_embedder(0) still added);
- experts are routed by token (`TokenExperts`): VAE tokens -> generation expert, text, markers and
  ViT tokens -> understanding expert; the final norm likewise;
- attention is one masked softmax per sample (`packing.attention_mask`), so samples never see
  each other; keys and values are repeated over the query heads as the official code does;
- outputs per token: ce = cross_entropy(lm_head(h[ce_indexes]), labels) and
  mse = (llm2vae(h[mse_indexes]) - (noise - x0)[t > 0])^2, channels kept (the reduction is
  model/training/losses.py).
The caller owns precision (autocast) and randomness (the batch carries its draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from strokes.model.network.bagel import Bagel
from strokes.model.network.decoder import TokenExperts, rope_tables, route
from strokes.model.network.vae import AutoEncoder
from strokes.model.training.packing import PackedBatch


@dataclass(frozen=True)
class ForwardOptions:
    timestep_shift: float = 1.0
    checkpoint_layers: bool = False  # recompute each decoder layer in the backward (activation checkpointing)
    trace: bool = False  # keep the intermediates the golden cases record (TokenLosses.trace)
    # Under FSDP every rank must give every trainable parameter a gradient, even when its pack has
    # no CE token, image or ViT token: run such heads on nothing (TokenLosses.zero).
    all_heads: bool = False


@dataclass
class TokenLosses:
    ce: Tensor | None  # (n_ce,) per-token cross-entropy; None without CE tokens
    mse: Tensor | None  # (n_mse, P) per-element squared error; None without loss images
    trace: dict[str, Tensor] = field(default_factory=dict)
    zero: Tensor | None = None  # 0, tied to the heads this pack did not use (all_heads)


def shift_timesteps(raw: Tensor, shift: float) -> Tensor:
    """Raw normal draws (-inf for clean images) -> flow time t in [0, 1): sigmoid, then the shift."""
    t = torch.sigmoid(raw)
    return shift * t / (1 + (shift - 1) * t)


def patchify_latents(padded_latent: Tensor, shapes: list[tuple[int, int]], p: int) -> Tensor:
    """padded_latent (N, Z, Hm/8, Wm/8) -> (n_vae, p*p*Z): each image's h x w tokens, (py, px, c) order."""
    tokens = []
    channels = padded_latent.shape[1]
    for latent, (h, w) in zip(padded_latent, shapes, strict=True):
        x = latent[:, : h * p, : w * p].reshape(channels, h, p, w, p)  # (Z, h, p, w, p)
        tokens.append(torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * channels))  # (h*w, P)
    return torch.cat(tokens)


def masked_attention(masks: list[Tensor], sample_lens: list[int]):
    """attend(q (1, H, L, D), k (1, G, L, D), v (1, G, L, D)) -> (1, H, L, D), one mask per sample."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)  # (1, H, L, D)
        v = v.repeat_interleave(groups, dim=1)  # (1, H, L, D)
        outs, start = [], 0
        for mask, n in zip(masks, sample_lens, strict=True):
            end = start + n
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn_mask=mask
                )
            )
            start = end
        return torch.cat(outs, dim=2)  # (1, H, L, D)

    return attend


@torch.no_grad()
def encode_latents(vae: AutoEncoder, batch: PackedBatch, trace: dict[str, Tensor] | None) -> Tensor:
    """The posterior sample of the padded image batch: (N, Z, Hm/8, Wm/8), scaled and shifted.

    An image fed twice (the noisy draft and its clean copy) is encoded once: batch elements go
    through the encoder independently, so its moments are the same; each copy draws its own sample.
    """
    if batch.posterior_eps is None:
        raise ValueError("the batch has no posterior draw: attach_noise first")
    param = next(vae.parameters())
    unique = list(dict.fromkeys(batch.vae_keys))
    first = [batch.vae_keys.index(k) for k in unique]
    images = batch.padded_images[first].to(param.device, param.dtype)  # (U, 3, Hm, Wm)
    mean, logvar = vae.encode_moments(images)  # (U, Z, Hm/8, Wm/8) each
    pick = torch.tensor([unique.index(k) for k in batch.vae_keys], device=mean.device)
    mean, logvar = mean[pick], logvar[pick]  # (N, Z, Hm/8, Wm/8)
    if trace is not None:
        trace["fwd.vae_moments"] = torch.cat([mean, logvar], dim=1)
    return vae.posterior(mean, logvar, batch.posterior_eps.to(param.device, param.dtype))


def training_forward(model: Bagel, vae: AutoEncoder, batch: PackedBatch, opts: ForwardOptions) -> TokenLosses:
    """Per-token CE and MSE of one packed batch (see the module docstring)."""
    cfg = model.cfg
    trace: dict[str, Tensor] | None = {} if opts.trace else None
    lm = model.language_model
    emb = model.embed_tokens(batch.text_ids)  # (n_text, E)
    seq = emb.new_zeros(batch.sequence_length, cfg.llm.hidden_size)  # (L, E)
    seq[batch.text_indexes] = emb
    und = [batch.text_indexes]
    zero = seq.new_zeros(())

    if batch.vit_tokens is not None:
        vit_outs, start = [], 0
        for n in batch.vit_seqlens:  # full attention within each image (the official cu_seqlens)
            end = start + n
            vit_outs.append(model.vit_model(batch.vit_tokens[start:end], batch.vit_position_ids[start:end]))
            start = end
        vit_out = torch.cat(vit_outs)  # (n_vit, C)
        connected = model.connector(vit_out)  # (n_vit, E)
        seq[batch.vit_token_indexes] = (connected + model.vit_pos_embed(batch.vit_position_ids)).to(seq.dtype)
        und.append(batch.vit_token_indexes)
        if trace is not None:
            trace["fwd.vit_out"], trace["fwd.connector_out"] = vit_out, connected
    elif opts.all_heads:
        nothing = batch.text_ids.new_zeros(0)
        patches = seq.new_zeros(0, cfg.vit.patch_dim)
        zero = zero + model.connector(model.vit_model(patches, nothing)).sum()

    gen = batch.vae_token_indexes
    if gen is not None:
        padded_latent = encode_latents(vae, batch, trace)
        x0 = patchify_latents(padded_latent, batch.latent_shapes, cfg.latent_patch_size).to(
            seq.device
        )  # (n_vae, P)
        noise = batch.flow_noise.to(x0)  # (n_vae, P)
        t = shift_timesteps(batch.timesteps.to(x0), opts.timestep_shift)  # (n_vae,)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise  # (n_vae, P)
        t_embed = model.time_embedder(t)  # (n_vae, E)
        latent = model.vae2llm(x_t) + t_embed + model.latent_pos_embed(batch.latent_position_ids)
        seq[gen] = latent.to(seq.dtype)
        if trace is not None:
            trace.update(
                {
                    "fwd.padded_latent": padded_latent,
                    "fwd.packed_latent_clean": x0,
                    "fwd.t_shifted": t,
                    "fwd.timestep_embeds": t_embed,
                    "fwd.x_t": x_t,
                }
            )
    else:
        gen = batch.text_indexes.new_zeros(0)
        if opts.all_heads:
            nothing = seq.new_zeros(0)
            zero = (
                zero
                + (model.vae2llm(seq.new_zeros(0, cfg.patch_latent_dim)) + model.time_embedder(nothing)).sum()
            )

    experts = TokenExperts(und=torch.cat(und), gen=gen)
    positions = batch.position_ids[None]  # (1, L)
    cos, sin = rope_tables(positions, cfg.llm.head_dim, cfg.llm.rope_theta, seq.dtype)  # (1, 1, L, D)
    masks = [batch.attention_mask(i, seq.device) for i in range(len(batch.sample_lens))]
    attend = masked_attention(masks, batch.sample_lens)
    x = seq[None]  # (1, L, E)
    for layer in lm.model.layers:
        if opts.checkpoint_layers and torch.is_grad_enabled():
            x = checkpoint(layer, x, cos, sin, experts, attend, use_reentrant=False)
        else:
            x = layer(x, cos, sin, experts, attend)
    hidden = route(x, experts, lm.model.norm, lm.model.norm_moe_gen)[0]  # (L, E)

    mse = None
    if batch.num_mse:
        preds = model.llm2vae(hidden[batch.mse_indexes])  # (n_mse, P)
        target = noise - x0  # velocity from data to noise
        mse = (preds - target[t > 0]) ** 2  # (n_mse, P)
        if trace is not None:
            trace["fwd.mse_preds"] = preds
    elif opts.all_heads:
        mse = model.llm2vae(hidden[:0]) ** 2  # (0, P)
    ce = None
    if batch.num_ce or opts.all_heads:
        logits = lm.lm_head(hidden[batch.ce_indexes])  # (n_ce, V)
        ce = F.cross_entropy(logits.float(), batch.label_ids, reduction="none")  # (n_ce,)
        if trace is not None:
            trace["fwd.ce_logits"] = logits
    if trace is not None:
        trace["fwd.last_hidden_state"] = hidden
    return TokenLosses(ce, mse, trace or {}, zero if opts.all_heads else None)


class TrainingBagel(Bagel):
    """Bagel whose `forward` is the training forward: the same parameters under the same names
    (a checkpoint loads unchanged), and a module forward for FSDP2's hooks to run around."""

    def forward(self, batch: PackedBatch, vae: AutoEncoder, opts: ForwardOptions) -> TokenLosses:
        return training_forward(self, vae, batch, opts)
