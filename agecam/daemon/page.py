"""The preview page: every camera's live stream and its status (and the sinks'), kept current from /healthz.

The page holds no secret: with a token, the request that fetched it set an HttpOnly cookie, which the browser sends
with the stream and /healthz requests the page makes (same origin).
"""
from __future__ import annotations

import html
from urllib.parse import quote

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agecam preview</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;background:#111;color:#ddd;margin:1em}}
h1{{font-size:1.2em;margin:0 0 .5em}}
.cams{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{margin:0;background:#222;padding:.5em;border-radius:6px}}
figcaption{{margin-bottom:.3em}}
img{{display:block;max-width:100%;width:640px;background:#000}}
.state{{font-weight:bold}} .online,.ended{{color:#5c5}} .offline,.crashed,.down{{color:#e55}} .starting{{color:#ea3}}
</style></head><body>
<h1>agecam &mdash; live preview</h1>
<p id="sinks"></p>
<div class="cams">
{figures}
</div>
<script>
async function poll() {{
  try {{
    const r = await fetch('healthz', {{cache: 'no-store', credentials: 'same-origin'}});
    const j = await r.json();
    for (const [name, c] of Object.entries(j.cameras || {{}})) {{
      const el = document.getElementById('state-' + name);
      const s = c.status;
      if (el) {{ el.textContent = s; el.className = 'state ' + s; }}
    }}
    const sinks = Object.entries(j.sinks || {{}}).map(([n, k]) =>
      n + ' ' + (k.connected ? 'connected' : 'down: ' + k.reason) + (k.backlog ? ' (' + k.backlog + ' waiting)' : ''));
    document.getElementById('sinks').textContent = sinks.length ? 'sinks: ' + sinks.join(' \u00b7 ') : '';
  }} catch (e) {{}}
}}
setInterval(poll, 2000);
</script>
</body></html>
"""

_FIGURE = """<figure id="cam-{name}"><figcaption>{name} &mdash; <span id="state-{name}" class="state {state}">{state}</span></figcaption>
<img id="stream-{name}" alt="live preview of {name}" src="cameras/{qname}/stream.mjpg"></figure>"""


def render_page(camera_status: dict[str, str]) -> str:
    """The HTML page for these cameras (name -> status, in display order)."""
    figures = "\n".join(
        _FIGURE.format(name=html.escape(name), qname=quote(name, safe=""), state=html.escape(status))
        for name, status in camera_status.items())
    return _PAGE.format(figures=figures)
