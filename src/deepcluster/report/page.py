"""HTML of the report page: one self-contained file, images inlined as base64 data URIs,
inline CSS and a few lines of inline JavaScript to sort, filter and page the clusters.
No external file, font, script or network request: it opens from disk anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from deepcluster.data.transforms import center_crop, resize_shorter
from deepcluster.messages import plural


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def png_uri_bytes(payload: bytes) -> str:
    """PNG bytes (e.g. a matplotlib figure) as a data URI."""
    return data_uri(payload, "image/png")


def png_uri(image: np.ndarray | Image.Image) -> str:
    """A uint8 ``(H, W, 3)`` array or Pillow image as a PNG data URI."""
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return data_uri(buffer.getvalue(), "image/png")


def thumbnail_uri(image: Image.Image, size: int, quality: int = 80) -> str:
    """A square JPEG thumbnail (shorter side to ``size`` if larger, centre crop) as a data URI.

    Images smaller than ``size`` keep their pixels; the page enlarges them without smoothing.
    Tiny ones (under 16 px, e.g. the 8x8 digits) are PNG: JPEG blocks would blur every pixel.
    """
    image = image.convert("RGB")
    side = min(size, *image.size)
    square = center_crop(resize_shorter(image, side), side)
    if side < 16:
        return png_uri(square)
    buffer = io.BytesIO()
    square.save(buffer, format="JPEG", quality=quality, optimize=True)
    return data_uri(buffer.getvalue(), "image/jpeg")


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class Thumb:
    """One small image on the page: its data URI and a tooltip."""

    uri: str
    title: str


@dataclass
class ClusterCard:
    """A cluster in the browsable grid."""

    cluster: int
    size: int
    majority: str | None
    purity: float | None
    thumbs: list[Thumb]


@dataclass
class FilterRow:
    """A filter of the chosen layer: its gradient-ascent image and its top images."""

    channel: int
    ascent_uri: str | None
    top: list[Thumb]


STYLE = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#dfe3ea; --accent:#2f6fde; --card:#f7f8fb; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color:var(--ink);
       background:#fff; }
header, section, footer { max-width:1320px; margin:0 auto; padding:18px 24px; }
header { border-bottom:1px solid var(--line); }
h1 { font-size:24px; margin:0 0 4px; } h2 { font-size:19px; margin:0 0 10px; border-bottom:2px solid var(--accent);
     display:inline-block; padding-bottom:2px; }
.sub, .note, figcaption, .hint { color:var(--muted); }
nav a { margin-right:16px; color:var(--accent); text-decoration:none; font-weight:600; }
table.summary { border-collapse:collapse; margin:10px 0; }
table.summary td { padding:2px 14px 2px 0; vertical-align:top; } table.summary td:first-child { color:var(--muted); }
.figs { display:flex; flex-wrap:wrap; gap:14px; }
figure { margin:0; background:var(--card); border:1px solid var(--line); border-radius:6px; padding:8px; }
figure img { display:block; max-width:100%; }
figcaption { max-width:390px; font-size:12.5px; margin-top:4px; }
.wide figcaption { max-width:780px; }
.controls { margin:12px 0; display:flex; gap:10px; align-items:center; flex-wrap:wrap; }
button, select { font:inherit; padding:4px 10px; border:1px solid var(--line); border-radius:4px; background:#fff;
                 cursor:pointer; }
button.on { background:var(--accent); color:#fff; border-color:var(--accent); }
#cluster-grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(300px, 1fr)); gap:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:8px; }
.card.hidden { display:none; }
.card .head { font-size:12.5px; margin-bottom:6px; display:flex; justify-content:space-between; gap:6px; }
.card .head b { font-size:13.5px; }
.bar { height:4px; background:var(--line); border-radius:2px; margin:-2px 0 6px; }
.bar span { display:block; height:4px; background:#33a06f; border-radius:2px; }
.thumbs { display:flex; flex-wrap:wrap; gap:3px; }
.thumbs img, .unit img { width:var(--thumb); height:var(--thumb); image-rendering:pixelated; border-radius:2px; }
img.pixel { image-rendering:pixelated; }
.unit { display:flex; gap:12px; align-items:center; padding:8px 0; border-bottom:1px solid var(--line); }
.unit .ascent { text-align:center; font-size:12px; color:var(--muted); }
.unit .ascent img { width:calc(var(--thumb) * 1.6); height:calc(var(--thumb) * 1.6); }
.unit .tops { display:flex; flex-wrap:wrap; gap:3px; }
.note { background:#fff7e0; border:1px solid #f0dca0; padding:6px 10px; border-radius:4px; }
"""

SCRIPT = """
(function () {
  var grid = document.getElementById('cluster-grid');
  if (!grid) return;
  var cards = Array.prototype.slice.call(grid.children);
  var pageSize = parseInt(grid.getAttribute('data-page'), 10) || 24;
  var shown = pageSize, key = 'size', wanted = '';
  var more = document.getElementById('more'), count = document.getElementById('count');
  // The view can be linked: index.html#sort=purity&class=cat
  location.hash.replace(/^#/, '').split('&').forEach(function (pair) {
    var kv = pair.split('=');
    if (kv[0] === 'sort' && (kv[1] === 'size' || kv[1] === 'purity')) key = kv[1];
    if (kv[0] === 'class') wanted = decodeURIComponent(kv[1] || '');
  });
  document.querySelectorAll('button[data-sort]').forEach(function (b) {
    b.classList.toggle('on', b.getAttribute('data-sort') === key);
  });
  function render() {
    cards.sort(function (a, b) {
      var d = parseFloat(b.dataset[key]) - parseFloat(a.dataset[key]);
      return d !== 0 ? d : parseFloat(b.dataset.size) - parseFloat(a.dataset.size);
    });
    var visible = 0, matching = 0;
    cards.forEach(function (card) {
      grid.appendChild(card);
      var match = !wanted || card.dataset.cls === wanted;
      if (match) matching++;
      var show = match && visible < shown;
      if (show) visible++;
      card.classList.toggle('hidden', !show);
    });
    count.textContent = 'showing ' + visible + ' of ' + matching + ' clusters';
    more.style.display = visible < matching ? '' : 'none';
  }
  document.querySelectorAll('button[data-sort]').forEach(function (button) {
    button.addEventListener('click', function () {
      key = button.getAttribute('data-sort'); shown = pageSize;
      document.querySelectorAll('button[data-sort]').forEach(function (b) { b.classList.toggle('on', b === button); });
      render();
    });
  });
  var select = document.getElementById('class-filter');
  if (select) select.value = wanted;
  if (select) select.addEventListener('change', function () { wanted = select.value; shown = pageSize; render(); });
  more.addEventListener('click', function () { shown += pageSize; render(); });
  render();
})();
"""


def figure_html(uri: str, title: str, caption: str, wide: bool = False, pixel: bool = False) -> str:
    kind = ' class="wide"' if wide else ""
    image_class = ' class="pixel"' if pixel else ""
    return (f'<figure{kind}><img src="{uri}" alt="{esc(title)}"{image_class}>'
            f'<figcaption><b>{esc(title)}.</b> {esc(caption)}</figcaption></figure>')


def card_html(card: ClusterCard) -> str:
    purity = -1.0 if card.purity is None else card.purity
    head = f"<b>cluster {card.cluster}</b><span>{plural(card.size, 'image')}</span>"
    label = ""
    if card.majority is not None and card.purity is not None:
        label = (f'<div class="head"><span>majority <b>{esc(card.majority)}</b></span><span>purity '
                 f'{100 * card.purity:.0f}%</span></div><div class="bar"><span style="width:{100 * card.purity:.1f}%">'
                 f'</span></div>')
    thumbs = "".join(f'<img src="{t.uri}" title="{esc(t.title)}" alt="">' for t in card.thumbs)
    majority = esc(card.majority or "")
    return (f'<div class="card" data-size="{card.size}" data-purity="{purity:.6f}" data-cls="{majority}">'
            f'<div class="head">{head}</div>{label}<div class="thumbs">{thumbs}</div></div>')


def unit_html(row: FilterRow) -> str:
    if row.ascent_uri:
        ascent = (f'<div class="ascent"><img src="{row.ascent_uri}" alt="gradient ascent of filter {row.channel}">'
                  f"<br>filter {row.channel}</div>")
    else:
        ascent = f'<div class="ascent">filter {row.channel}</div>'
    tops = "".join(f'<img src="{t.uri}" title="{esc(t.title)}" alt="">' for t in row.top)
    return f'<div class="unit">{ascent}<div class="tops">{tops}</div></div>'


def page_html(title: str, subtitle: str, summary: list[tuple[str, str]], sections: list[tuple[str, str, str]],
              notes: list[str], footer: str, thumb_px: int) -> str:
    """The whole document.

    Args:
        title, subtitle: the header.
        summary: ``(name, value)`` rows of the run summary table.
        sections: ``(anchor, heading, inner HTML)``, in page order.
        notes: remarks shown under the header (what is missing and why).
        footer: text of the footer.
        thumb_px: display size of thumbnails (CSS pixels).
    """
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary)
    nav = "".join(f'<a href="#{anchor}">{esc(heading)}</a>' for anchor, heading, _ in sections)
    remarks = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    body = "".join(f'<section id="{anchor}"><h2>{esc(heading)}</h2>{inner}</section>'
                   for anchor, heading, inner in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}:root {{ --thumb:{thumb_px}px; }}</style></head><body>"
            f'<header><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div>'
            f'<table class="summary">{rows}</table><nav>{nav}</nav>{remarks}</header>'
            f"{body}<footer class=\"sub\">{esc(footer)}</footer><script>{SCRIPT}</script></body></html>\n")


__all__ = ["ClusterCard", "FilterRow", "Thumb", "card_html", "data_uri", "esc", "figure_html", "page_html",
           "png_uri", "png_uri_bytes", "thumbnail_uri", "unit_html"]
