"""``dvc plots show`` without the internet.

DVC's default HTML page loads Vega, Vega-Lite and Vega-Embed from a CDN, so the plots stay blank on
a machine without internet access. Its ``--html-template`` option takes a page with a ``{plot_divs}``
placeholder; :func:`offline_plots_template` returns one with the three libraries inlined (bundled by
``vl-convert-python``, which ships them), so the written page works from a file anywhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imtext.errors import ImtextError

#: DVC writes Vega-Lite v5 specifications.
VEGA_LITE_VERSION = "v5.21"

_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>imtext: DVC plots</title>
<script>
{bundle}
</script>
<style>body {{ font-family: sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def offline_plots_template() -> str:
    """An HTML template for ``dvc plots show --html-template`` with the Vega libraries inlined."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    # A "</script>" inside the bundle would end the tag early.
    return _PAGE.format(bundle=bundle.replace("</script>", "<\\/script>"))


def show_plots(out_dir: Path, targets: list[str] | None = None, repo: Path = Path(".")) -> Path:
    """Run ``dvc plots show`` with the offline template; returns the written ``index.html``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = out_dir / "template.html"
    template.write_text(offline_plots_template(), encoding="utf-8")
    dvc = Path(sys.executable).parent / "dvc"
    command = [str(dvc) if dvc.exists() else "dvc", "plots", "show"]
    command += ["--html-template", str(template.resolve()), "-o", str(out_dir.resolve())]
    result = subprocess.run(command + list(targets or []), cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise ImtextError(
            f"`dvc plots show` failed in {repo.resolve()}: {result.stderr.strip()}; run `dvc repro` "
            "first so the plot files exist"
        )
    return out_dir / "index.html"
