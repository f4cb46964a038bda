#!/usr/bin/env python3
"""Drive pier's dashboard in headless Chromium (Debian's, through Playwright) the way an operator
would: open /ui/, see every member alive and bytes served, press retry on the failed job, see it
succeed, and keep a screenshot.

    dashboard.py URL MEMBERS SCREENSHOT

Exit status 0 when everything was seen; otherwise the first thing that was not, on stderr.
"""
import sys

from playwright.sync_api import expect, sync_playwright

url, members, screenshot = sys.argv[1], int(sys.argv[2]), sys.argv[3]

with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/ui/")
    expect(page).to_have_title("pier")

    alive = page.locator("#members tbody tr", has=page.locator("td.state.alive"))
    expect(alive).to_have_count(members, timeout=15000)
    print(f"members alive: {alive.count()}")

    local = page.locator("#served-local")
    expect(local).not_to_have_text("–", timeout=10000)
    expect(local).not_to_have_text("0 B")
    print(f"served from this node: {local.inner_text()}")

    failed = page.locator("#jobs tbody tr", has=page.locator("td.job-failed"))
    expect(failed.first).to_be_visible(timeout=20000)
    job = failed.first.get_attribute("data-job")
    print(f"failed job: {job}: {failed.first.inner_text()}")
    failed.first.locator("button.retry").click()

    row = page.locator(f'#jobs tbody tr[data-job="{job}"]')
    expect(row.locator("td.state")).to_have_text("succeeded", timeout=30000)
    print(f"job {job} after retry: {row.inner_text()}")
    page.screenshot(path=screenshot, full_page=True)
    print(f"screenshot: {screenshot}")
    browser.close()
    if errors:
        print("script errors on the page: " + "; ".join(errors), file=sys.stderr)
        sys.exit(1)
