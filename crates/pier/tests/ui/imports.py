#!/usr/bin/env python3
"""Open a node's dashboard in headless Chromium (Debian's, through Playwright) and check its
"Sync and import jobs" table for the imports of a watched folder.

    imports.py URL FILE=STATE=TEXT...

Each FILE=STATE=TEXT asks for a row of kind `import` naming FILE, in STATE, with TEXT somewhere
in it (an image, or the reason it failed); a failed import has no retry button. Exit status 0
when every row is there; otherwise the first that was not, on stderr.
"""
import sys

from playwright.sync_api import expect, sync_playwright

url, expected = sys.argv[1], sys.argv[2:]

with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
    )
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/ui/")
    rows = page.locator("#jobs tbody tr")
    for want in expected:
        file, state, text = want.split("=", 2)
        row = rows.filter(has=page.locator("td", has_text=file)).filter(has_text="import").first
        expect(row).to_be_visible(timeout=10000)
        expect(row.locator("td.state")).to_have_text(state, timeout=10000)
        expect(row).to_contain_text(text, timeout=10000)
        if state == "failed":
            expect(row.locator("button.retry")).to_have_count(0)
        print(f"{file}: {row.inner_text()}")
    browser.close()
    if errors:
        print("script errors on the page: " + "; ".join(errors), file=sys.stderr)
        sys.exit(1)
