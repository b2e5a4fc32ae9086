"""What makes Japanese readable in review figures and screenshots: a CJK font for matplotlib
(found even when matplotlib's font cache predates the font's installation), and headless-Chromium
screenshots of the HTML pages.

    python -m eval.plots fonts                     # refresh matplotlib's font cache, print the CJK font used
    python -m eval.plots screenshot page.html page.png [--width 1400 --height 1800]

Japanese needs a CJK font on the system (Debian: ``apt-get install fonts-noto-cjk``; ``make fonts``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from decoding.errors import FusemtError, fail

# Preferred in this order; any other installed font that draws Japanese is the fallback.
CJK_FONTS = ["Noto Sans CJK JP", "Noto Sans JP", "Source Han Sans JP", "IPAexGothic", "IPAGothic", "TakaoGothic",
             "VL Gothic", "Hiragino Sans", "Yu Gothic", "MS Gothic", "Noto Serif CJK JP", "Droid Sans Fallback",
             "WenQuanYi Zen Hei"]
JAPANESE_SAMPLE = "日本語かなカナ"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _draws_japanese(path: str) -> bool:
    from matplotlib import font_manager

    try:
        font = font_manager.get_font(path)
    except (OSError, RuntimeError):
        return False
    return all(font.get_char_index(ord(ch)) for ch in JAPANESE_SAMPLE)


def _find_cjk(font_list) -> str | None:
    import matplotlib

    names = {entry.name: entry.fname for entry in font_list}
    preferred = next((name for name in CJK_FONTS if name in names), None)
    # matplotlib's own fonts have no Japanese; its "Last Resort" font maps every character to a placeholder box
    bundled = str(Path(matplotlib.get_data_path()).resolve())
    return preferred or next((name for name, path in sorted(names.items())
                              if not str(Path(path).resolve()).startswith(bundled) and _draws_japanese(path)), None)


def _font_cache_path() -> Path:
    """Where matplotlib keeps its font list (the name ``font_manager._load_fontmanager`` reads)."""
    import matplotlib
    from matplotlib import font_manager

    return Path(matplotlib.get_cachedir()) / f"fontlist-v{font_manager.FontManager.__version__}.json"


def add_new_system_fonts() -> list[str]:
    """Add the system's font files that matplotlib's cached font list lacks (fonts installed after
    the cache was built, which matplotlib otherwise never sees) and save the list, so later
    processes see them too. Returns the added files."""
    from matplotlib import font_manager

    manager = font_manager.fontManager
    known = {entry.fname for entry in manager.ttflist}
    added = []
    for path in sorted(set(font_manager.findSystemFonts()) - known):
        try:
            manager.addfont(path)
        except (OSError, RuntimeError, ValueError):  # a font file FreeType cannot read is skipped
            continue
        added.append(path)
    if added:
        font_manager.json_dump(manager, _font_cache_path())
    return added


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The installed font matplotlib should draw Japanese with, or None when there is none."""
    from matplotlib import font_manager

    font = _find_cjk(font_manager.fontManager.ttflist)
    if font is None and add_new_system_fonts():
        font = _find_cjk(font_manager.fontManager.ttflist)
    return font


def use_cjk_font() -> str | None:
    """Select matplotlib's Agg backend and, when a CJK font is installed, draw text in DejaVu Sans
    with that font as the fallback for glyphs DejaVu lacks (matplotlib >= 3.6 falls back per glyph)."""
    import matplotlib

    matplotlib.use("Agg")
    font = cjk_font()
    if font:
        matplotlib.rcParams["font.family"] = ["DejaVu Sans", font]
    return font


def label_text(text: str) -> str:
    """Text for a figure label: as it is with a CJK font, else with escapes instead of empty boxes."""
    return text if cjk_font() else ascii(text)[1:-1]


def chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 1800) -> Path:
    """A PNG of an HTML page as headless Chromium draws it (fonts from the system's fontconfig)."""
    browser = chromium()
    if browser is None:
        raise FusemtError("no Chromium to take screenshots with: install it (Debian: apt-get install chromium; "
                          "make fonts)")
    with tempfile.TemporaryDirectory(prefix="fusemt-chromium-") as profile:
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not png.exists():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FusemtError(f"Chromium could not draw {page} (exit {proc.returncode}: {tail}): check the browser runs "
                          f"headless ({browser} --headless --version)")
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CJK fonts for matplotlib, and page screenshots.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fonts", help="add fonts installed since matplotlib's cache was built; print the CJK font")
    shot = commands.add_parser("screenshot", help="a PNG of an HTML page drawn by headless Chromium")
    shot.add_argument("page", type=Path)
    shot.add_argument("png", type=Path)
    shot.add_argument("--width", type=int, default=1400)
    shot.add_argument("--height", type=int, default=1800)
    args = parser.parse_args(argv)
    try:
        if args.command == "fonts":
            added = add_new_system_fonts()
            font = cjk_font()
            print(f"added {len(added)} font files to matplotlib's cache {_font_cache_path()}")
            print(f"CJK font: {font}" if font else "no CJK font installed: install one (Debian: fonts-noto-cjk)")
        else:
            print(f"wrote {screenshot(args.page, args.png, args.width, args.height)}")
    except FusemtError as err:
        fail(err)


if __name__ == "__main__":
    main()
