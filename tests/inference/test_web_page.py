"""The web page in a real headless Chromium (Debian's package, driven by Playwright)."""

import base64
import os
from pathlib import Path

import pytest

from tests.inference.serving import image_bytes

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Developers without Chromium skip; CI (CI=1) must run the browser test, so it fails instead.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("CI"),
        reason=f"{CHROMIUM} missing: apt-get install -y chromium",
    ),
]


@pytest.fixture(scope="module")
def page():
    """A fresh page in headless Chromium; requests outside localhost are blocked (offline)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        context = browser.new_context()
        outside = []

        def block_outside(route):
            if route.request.url.startswith("http://127.0.0.1"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", block_outside)
        yield context.new_page()
        assert not outside, f"the page tried to fetch {outside} (it must work offline)"
        browser.close()


def check_results(page, names: list[str], version: str) -> None:
    """Each uploaded image has a card with its name, 3 bars and the answering version."""
    cards = page.locator(".result")
    cards.first.wait_for(timeout=30_000)
    assert cards.count() == len(names)
    for i, name in enumerate(names):
        card = cards.nth(i)
        assert card.locator(".filename").inner_text() == name
        assert card.locator(".bar").count() == 3
        widths = [
            card.locator(".bar .fill").nth(j).evaluate("e => parseFloat(e.style.width)")
            for j in range(3)
        ]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0
        assert version in card.locator(".version").inner_text()
        assert card.locator("img").evaluate("e => e.complete && e.naturalWidth > 0")
    assert page.locator("#model-version").inner_text() == version


def test_page_classifies_two_picked_images(page, server, served_models, tmp_path):
    _, version = served_models
    page.goto(server.url + "/")
    page.locator("#model-version").filter(has_text=version).wait_for(timeout=30_000)
    first, second = tmp_path / "red.png", tmp_path / "blue.jpg"
    first.write_bytes(image_bytes(color=(220, 20, 20)))
    second.write_bytes(image_bytes(color=(20, 20, 220), fmt="JPEG"))
    page.locator("#files").set_input_files([first, second])
    check_results(page, ["red.png", "blue.jpg"], version)
    assert "2 images classified" in page.locator("#status").inner_text()


def test_page_classifies_dropped_images_and_shows_errors(page, server, served_models):
    _, version = served_models
    page.goto(server.url + "/")
    files = [
        ("green.png", "image/png", image_bytes(color=(20, 200, 20))),
        ("notes.txt", "text/plain", b"not an image"),
    ]
    # Build a DataTransfer with real File objects and drop it on the drop zone.
    transfer = page.evaluate_handle(
        """files => {
            const transfer = new DataTransfer();
            for (const [name, type, b64] of files) {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, { type }));
            }
            return transfer;
        }""",
        [[n, t, base64.b64encode(d).decode()] for n, t, d in files],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    cards = page.locator(".result")
    cards.nth(1).wait_for(timeout=30_000)
    assert cards.nth(0).locator(".bar").count() == 3
    assert version in cards.nth(0).locator(".version").inner_text()
    assert cards.nth(1).locator(".filename").inner_text() == "notes.txt"
    assert "not a recognised image" in cards.nth(1).locator(".error").inner_text()
    assert "1 of 2 images classified" in page.locator("#status").inner_text()
