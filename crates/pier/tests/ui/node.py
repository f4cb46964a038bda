#!/usr/bin/env python3
"""Open a single node's dashboard in headless Chromium (Debian's, through Playwright) and check
what it says about the node itself: its name in the header, and the health of upstreams nothing
has asked yet.

    node.py URL NAME EXPECTED...

EXPECTED are `UPSTREAM=HEALTH` pairs, HEALTH being the text of the health cell. Exit status 0
when the header names NAME and each listed upstream shows its health; otherwise the first thing
that was not, on stderr.
"""
import sys

from playwright.sync_api import expect, sync_playwright

url, name, expected = sys.argv[1], sys.argv[2], sys.argv[3:]

with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
    )
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/ui/")
    expect(page.locator("#node")).to_contain_text(name + " ", timeout=10000)
    print(f"header: {page.locator('#node').inner_text()}")
    rows = page.locator("#upstreams tbody tr")
    expect(rows.first).to_be_visible(timeout=10000)
    for pair in expected:
        upstream, health = pair.split("=", 1)
        row = rows.filter(has=page.locator("td", has_text=upstream)).first
        expect(row.locator("td").nth(2)).to_have_text(health, timeout=10000)
        print(f"{upstream}: {row.locator('td').nth(2).inner_text()}")
    browser.close()
    if errors:
        print("script errors on the page: " + "; ".join(errors), file=sys.stderr)
        sys.exit(1)
