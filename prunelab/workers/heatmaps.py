"""Importance heatmaps: which visual tokens a trial kept, merged or dropped, over the image.

For the first few samples of a trial (``eval.heatmaps``) the runner runs the sample once more
(same plan, same seeded generator, so the same selection); its ``SampleRun`` holds what the
method chose: the vision stage's :class:`~prunelab.methods.base.VisionSelection` and, from the
layer-stage pruner (:class:`~prunelab.workers.pruning.LayerPruner`) of the generation, where the
visual tokens sat in the LLM sequence and which of them each layer step kept.
:func:`token_fate` turns that into one state per visual token entering the vision stage, and
:func:`render_token_fate` draws the token grid of every tile over the image as a PNG:

- kept: present at the end of the prefill (image shown as is, green outline);
- merged: merged by the vision stage into a token that stays (blue tint);
- dropped: removed before the LLM (grey);
- pruned in the LLM: removed by a layer stage (orange tint; the layer is in the legend).

Tokens are placed by the adapter's ``Prepared.coords`` (tile, row, col). Tile 0 is the whole
image in every family (LLaVA's single grid, LLaVA-NeXT's base crop, Qwen2-VL's merged grid,
InternVL's thumbnail) and is drawn over it; other tiles (LLaVA-NeXT's high-resolution grid,
InternVL's crops) are drawn as bare grids beside it. No MLflow here: the PNG bytes travel in
``TrialResult.artifacts``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from prunelab.methods.base import VisionSelection

__all__ = [
    "DROPPED",
    "KEPT",
    "MERGED",
    "PRUNED_IN_LLM",
    "TokenFate",
    "render_token_fate",
    "token_fate",
]

KEPT, MERGED, DROPPED, PRUNED_IN_LLM = 0, 1, 2, 3
STATE_NAMES = {KEPT: "kept", MERGED: "merged", DROPPED: "dropped", PRUNED_IN_LLM: "pruned in LLM"}
# RGBA overlays per state; kept tokens show the image untouched inside a green outline
_OVERLAY = {
    KEPT: (0, 0, 0, 0),
    MERGED: (40, 110, 255, 130),
    DROPPED: (140, 140, 140, 215),
    PRUNED_IN_LLM: (255, 120, 0, 160),
}
_KEPT_OUTLINE = (40, 230, 60, 255)
_LEGEND_SWATCH = {
    KEPT: (40, 230, 60),
    MERGED: (40, 110, 255),
    DROPPED: (140, 140, 140),
    PRUNED_IN_LLM: (255, 120, 0),
}
_PANEL_PX = 240  # side of the longer edge of a tile panel
_LEGEND_PX = 34


@dataclass
class TokenFate:
    """What happened to each of the N visual tokens entering the vision stage.

    coords: (N, 3) int (tile, row, col); state: (N,) one of KEPT, MERGED, DROPPED,
    PRUNED_IN_LLM; layer: (N,) the decoder layer at whose input a PRUNED_IN_LLM token left the
    sequence, -1 for the others.
    """

    coords: np.ndarray
    state: np.ndarray
    layer: np.ndarray

    def counts(self) -> dict[str, int]:
        """Tokens per state name (every state present, zero included)."""
        return {name: int((self.state == code).sum()) for code, name in STATE_NAMES.items()}


def token_fate(
    coords: torch.Tensor,
    vision: VisionSelection | None,
    visual_positions: torch.Tensor | None = None,
    kept_at: Mapping[int, torch.Tensor] | None = None,
) -> TokenFate:
    """Per-token states from a vision-stage selection and the layer stages of the prefill.

    coords: (N, 3) of the tokens entering the vision stage. vision: its selection (``kept``
    (M,) anchors into N, ``assignment`` (N,) output each input merged into, -1 dropped), None
    when the method has no vision stage (M = N). visual_positions: (M,) positions of the M
    tokens in the LLM's prefill sequence; kept_at: per layer step (its decoder layer), the
    positions of the visual tokens it kept (``LayerPruner.kept_at``). None / empty: no layer
    stage ran.
    """
    n = int(coords.shape[0])
    if vision is None:
        anchors = torch.arange(n)
        assignment = None
    else:
        anchors = vision.kept.detach().cpu().long()
        assignment = None if vision.assignment is None else vision.assignment.detach().cpu()
        if assignment is not None and assignment.shape != (n,):
            raise ValueError(f"vision assignment has shape {tuple(assignment.shape)}, need ({n},)")
    m = int(anchors.numel())
    # per output token: the layer at whose input it left the LLM (-1: still there at the end)
    left_at = torch.full((m,), -1, dtype=torch.long)
    if visual_positions is not None:
        positions = visual_positions.detach().cpu()
        if positions.numel() != m:
            raise ValueError(f"the LLM saw {positions.numel()} visual tokens, the vision stage {m}")
        for layer, kept in sorted((kept_at or {}).items()):
            alive = torch.isin(positions, kept.detach().cpu())
            left_at[(~alive) & (left_at < 0)] = layer

    state = torch.full((n,), DROPPED, dtype=torch.long)
    layer = torch.full((n,), -1, dtype=torch.long)
    # merged tokens first, so that an anchor (also "assigned" to its own output) overrides them
    if assignment is not None:
        merged = assignment >= 0
        target = assignment.clamp_min(0).long()
        state[merged] = MERGED
        gone = merged & (left_at[target] >= 0)
        state[gone] = PRUNED_IN_LLM
        layer[gone] = left_at[target][gone]
    state[anchors] = torch.where(left_at >= 0, PRUNED_IN_LLM, KEPT)
    layer[anchors] = left_at
    return TokenFate(
        coords=coords.detach().cpu().long().numpy(),
        state=state.numpy().astype(np.int8),
        layer=layer.numpy(),
    )


# -- rendering ----------------------------------------------------------------------------------
def _tile_panel(fate: TokenFate, tile: int, image: np.ndarray | None) -> Image.Image:
    """One tile's token grid as an RGB image, over ``image`` (H, W, 3) uint8 when given."""
    chosen = fate.coords[:, 0] == tile
    coords, states = fate.coords[chosen], fate.state[chosen]
    rows = int(coords[:, 1].max()) + 1
    cols = int(coords[:, 2].max()) + 1
    scale = _PANEL_PX / max(rows, cols)
    width, height = max(1, round(cols * scale)), max(1, round(rows * scale))
    if image is not None:
        base = Image.fromarray(np.ascontiguousarray(image[..., :3])).convert("RGB")
        base = base.resize((width, height), Image.Resampling.BILINEAR)
    else:
        base = Image.new("RGB", (width, height), (200, 200, 200))
    overlay = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for (_, row, col), state in zip(coords, states, strict=True):
        box = (
            round(col * scale),
            round(row * scale),
            round((col + 1) * scale) - 1,
            round((row + 1) * scale) - 1,
        )
        if int(state) == KEPT:
            draw.rectangle(box, outline=_KEPT_OUTLINE, width=max(1, round(scale / 10)))
        else:
            draw.rectangle(box, fill=_OVERLAY[int(state)])
            if scale >= 6:
                draw.rectangle(box, outline=(255, 255, 255, 60))
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")


def render_token_fate(image: np.ndarray | None, fate: TokenFate, title: str = "") -> bytes:
    """PNG bytes: each tile's token grid (tile 0 over ``image``) and a legend with counts.

    image: (H, W, 3) uint8 RGB of the sample, or None to draw bare grids.
    """
    if fate.coords.shape[0] == 0:
        raise ValueError("no visual tokens to draw")
    tiles = sorted({int(t) for t in fate.coords[:, 0]})
    panels = [_tile_panel(fate, tile, image if tile == 0 else None) for tile in tiles]
    gap = 6
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    font = ImageFont.load_default()
    counts = fate.counts()
    pruned_layers = sorted({int(x) for x in fate.layer[fate.state == PRUNED_IN_LLM]})
    header = 14 if title else 0
    legend_width = 8 + sum(18 + 8 * len(f"{n} {c}") for n, c in counts.items())
    width = max(width, legend_width)
    canvas = Image.new("RGB", (width, header + max(p.height for p in panels) + _LEGEND_PX), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 1), title, fill=(0, 0, 0), font=font)
    x = 0
    for tile, panel in zip(tiles, panels, strict=True):
        canvas.paste(panel, (x, header))
        if len(tiles) > 1:
            draw.text((x + 3, header + 2), f"tile {tile}", fill=(255, 255, 255), font=font)
        x += panel.width + gap
    y = header + max(p.height for p in panels) + 4
    x = 4
    for code, name in STATE_NAMES.items():
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=_LEGEND_SWATCH[code], outline=(0, 0, 0))
        label = f"{name} {counts[name]}"
        draw.text((x + 14, y + 1), label, fill=(0, 0, 0), font=font)
        x += 18 + int(draw.textlength(label, font=font)) + 6
    if pruned_layers:
        layers = ", ".join(str(layer) for layer in pruned_layers)
        draw.text((4, y + 16), f"pruned at layer(s) {layers}", fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
