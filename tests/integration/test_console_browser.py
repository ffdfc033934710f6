"""The web console in real browsers against real nodes: Debian's headless Chromium (Selenium) through
the whole scenario, and Debian's Firefox ESR (Marionette) through a subset with the same checks: the
page, the join arriving over the event stream without a reload, the token copy, a chat that streams
and stops, phone width.

Node A runs with the console on its home; node B is a mesh of its own. The page must show A, join
B's mesh from a pasted token and show the split, stream a chat and stop it, download a model from
the local Hub stand-in and restart A with it, refuse bad input of every kind without changing the
node, refuse cross-origin and foreign-Host requests, and start and stop the node. Each view is
saved as a PNG under $MESH_TEST_ARTIFACTS (or the test's temp dir).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from common.default_model import default_model_path
from common.gguf_info import inspect_gguf
from common.local_keys import read_llama_key
from tests.integration.harness import Node, meshctl
from tests.support.browsers import (CSS, ID, Firefox, chromium, click, fill, have_chromium, have_firefox, node_rows,
                                    shot, tab, text, wait_text)
from tests.support.hub_standin import HubFile, HubRepo, HubStandIn
from tests.support.procs import free_port, kill_process_tree, wait_until

pytestmark = pytest.mark.slow
if not have_chromium():
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("selenium.webdriver")
needs_firefox = pytest.mark.skipif(not have_firefox(), reason="needs Debian's firefox-esr (apt-get install -y "
                                   "firefox-esr) and marionette-driver (the test extra)")

GATED = "hf_console_test_token"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("MESH_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts")) / "console"
    out.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots in {out}")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    from tests.support.random_gguf import write_preset
    tiny = write_preset(root / "tiny-llama.gguf", "tiny", seed=5)
    junk = root / "junk.bin"
    junk.write_bytes(b"<html>an error page, not a model</html>" * 200)
    hub = HubStandIn([HubRepo("test/tiny-llama-GGUF", {
        "tiny-llama-Q4_0.gguf": HubFile("tiny-llama-Q4_0.gguf", tiny, throttle_bps=6e6),
        "broken.gguf": HubFile("broken.gguf", junk),
        "huge-70B-Q8_0.gguf": HubFile("huge-70B-Q8_0.gguf", None, claimed_size=50 << 40)}),
        HubRepo("test/gated-GGUF", {"g.gguf": HubFile("g.gguf", tiny)}, gated_token=GATED)]).start()
    models = root / "models"
    models.mkdir()
    os.symlink(default_model_path(), models / default_model_path().name)
    (models / "notes.gguf").write_text("not a model")
    a = Node(root / "a", extra=["--split", "--max-vram", "8G", "--bind-host", "127.0.0.1"])
    b = Node(root / "b", extra=["--split", "--max-vram", "4G", "--bind-host", "127.0.0.1"])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"HF_ENDPOINT": hub.url, "HF_TOKEN": GATED, "MESH_MODELS_DIR": str(models)})
    console = None
    try:
        a.start()
        b.start()
        console = subprocess.Popen([sys.executable, "-m", "meshctl.cli", "console", "--home", str(a.home), "--port",
                                    str(port), "--no-open"], env=env, stdout=open(root / "console.log", "ab"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _get(url + "/api/state"), timeout=30, what="the console answering")
        a.wait_serving()
        yield {"a": a, "b": b, "url": url, "hub": hub, "tiny": tiny, "models": models, "root": root,
               "ids": {"a": a.node_id(), "b": b.node_id()}}
    finally:
        if console:
            kill_process_tree(console)
        for n in (a, b):
            n.stop()
        hub.stop()


def _get(url: str):
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def browser(world):
    driver = chromium()
    driver.set_window_size(1280, 1000)
    driver.get(world["url"] + "/")
    driver.execute_script("window.confirm = () => true")  # the page asks before rotate and leave
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def firefox(world, artifacts):
    """The same page in Firefox, opened once with node A solo and never reloaded: what it shows later
    came over its event stream."""
    driver = Firefox(log=world["root"] / "firefox.log")
    driver.set_window_size(1280, 1000)
    driver.get(world["url"] + "/")
    driver.execute_script("window.loadedOnce = 'yes'")  # gone if the page ever reloads
    yield driver
    driver.quit()


def mesh_id(node: Node) -> str:
    return node.status().get("meshd", {}).get("mesh_id", "")


# --- the scenarios, in order ------------------------------------------------------------------------

def shows_this_node(world, driver) -> None:
    a_id = world["ids"]["a"]
    wait_until(lambda: node_rows(driver) == [a_id], timeout=30, what="the page listing node A")
    wait_until(lambda: driver.find_element(ID, "plan-line").get_attribute("data-state") == "solo", timeout=60,
               what="the plan shown as solo")
    assert text(driver, "#plan-line").startswith(f"Solo — elected {a_id[:8]} (")
    assert "host" in text(driver, f'#nodes tr[data-node="{a_id}"]')
    assert "8.0 GB" in text(driver, f'#nodes tr[data-node="{a_id}"]')
    wait_text(driver, "#llama-line", "llama-server: ready")
    assert text(driver, "#live") == "live"


def test_page_shows_this_node(world, browser, artifacts):
    shows_this_node(world, browser)
    shot(browser, artifacts, "01-mesh-one-node")


@needs_firefox
def test_firefox_shows_this_node(world, firefox, artifacts):
    shows_this_node(world, firefox)
    shot(firefox, artifacts, "firefox-01-mesh-one-node")
    firefox.set_window_size(1280, 1000)


def test_bad_tokens_get_their_reason_and_change_nothing(world, browser):
    before = mesh_id(world["a"])
    for bad, reason in (("not-a-token", "not valid"), ("", "Paste a token first"),
                        (world["a"].token(), "printed by this node itself")):
        fill(browser, "join-input", bad)
        browser.find_element(ID, "join-button").click()
        wait_text(browser, "#join-msg", reason)
        assert "error" in browser.find_element(ID, "join-msg").get_attribute("class")
    assert mesh_id(world["a"]) == before and node_rows(browser) == [world["ids"]["a"]]


def test_pasting_a_token_joins_and_shows_the_split(world, browser, artifacts):
    ids = world["ids"]
    fill(browser, "join-input", world["b"].token())
    started = time.monotonic()
    browser.find_element(ID, "join-button").click()
    wait_text(browser, "#join-msg", "Joined mesh", timeout=40)

    def split_shown():
        segments = browser.find_elements(CSS, "#split-bar .seg")
        return sorted(node_rows(browser)) == sorted(ids.values()) and len(segments) == 2 and \
            browser.find_element(ID, "plan-line").get_attribute("data-state") == "split"
    wait_until(split_shown, timeout=180, interval=0.1, what="two nodes and a two-part split bar")
    seconds = time.monotonic() - started
    print(f"token pasted → split shown in the page: {seconds:.1f} s")
    bar = text(browser, "#split-bar")
    assert ids["a"][:8] in bar and ids["b"][:8] in bar and "(host)" in bar
    assert "67%" in bar and "33%" in bar  # by memory: 8 GB and 4 GB
    # the plan said once, in `meshctl status`'s words (not "Split over 2 nodes. (split over 2 nodes by memory)")
    assert text(browser, "#plan-line") == "Split over 2 nodes by memory."
    wait_text(browser, "#llama-line", "llama-server: ready", timeout=180)
    wait_until(lambda: world["a"].answers() and world["a"].runner()["llama"]["state"] == "ready" and
               world["a"].runner()["llama_plan_key"] == world["a"].status()["electd"]["key"], timeout=180, interval=0.3,
               what="A's llama-server serving the split plan")
    serving = time.monotonic() - started
    print(f"token pasted → llama-server serving the split: {serving:.1f} s")
    wait_text(browser, "#llama-line", "llama-server: ready", timeout=30)
    b_row = text(browser, f'#nodes tr[data-node="{ids["b"]}"]')
    assert "worker" in b_row and "same file" in b_row and " ms" in b_row
    shot(browser, artifacts, "02-mesh-split")
    (artifacts / "join-to-split-seconds.txt").write_text(f"split shown {seconds:.1f} s, serving it {serving:.1f} s\n")


@needs_firefox
def test_firefox_follows_the_join_without_a_reload(world, firefox, artifacts):
    """Chromium pasted the token; the Firefox page, open since A was solo, shows the split from its event stream."""
    ids = world["ids"]
    wait_until(lambda: sorted(node_rows(firefox)) == sorted(ids.values()) and
               len(firefox.find_elements(CSS, "#split-bar .seg")) == 2, timeout=60, interval=0.1,
               what="two nodes and a two-part split bar in Firefox")
    assert firefox.execute_script("return window.loadedOnce") == "yes", "the Firefox page reloaded"
    bar = text(firefox, "#split-bar")
    assert "67%" in bar and "33%" in bar
    wait_text(firefox, "#llama-line", "llama-server: ready", timeout=60)
    assert "worker" in text(firefox, f'#nodes tr[data-node="{ids["b"]}"]')
    shot(firefox, artifacts, "firefox-02-mesh-split")
    firefox.set_window_size(1280, 1000)


def show_and_copy_token(driver, token: str):
    """Show this node's token (it must be `token`), copy it, and return the box that shows it."""
    driver.find_element(ID, "show-token").click()
    box = driver.find_element(ID, "token-box")
    wait_until(lambda: box.get_property("value"), timeout=10, what="the token shown")
    assert box.get_property("value") == token
    driver.find_element(ID, "copy-token").click()
    wait_text(driver, "#invite-msg", "Copied")
    return box


@needs_firefox
def test_firefox_shows_and_copies_the_token(world, firefox):
    show_and_copy_token(firefox, world["a"].token())


def test_token_is_shown_copied_and_rotated(world, browser):
    box = show_and_copy_token(browser, world["a"].token())
    old = box.get_attribute("value")
    browser.find_element(ID, "rotate-token").click()
    wait_until(lambda: box.get_attribute("value") != old, timeout=10, what="a rotated token")
    assert box.get_attribute("value") == world["a"].token()
    assert mesh_id(world["a"]) == mesh_id(world["b"])  # still one mesh: rotation keeps members


def chat_streams_and_stops(world, browser) -> None:
    """A chat that streams and grows; Stop ends it on the page and on the host's llama-server."""
    tab(browser, "chat")
    fill(browser, "chat-input", "Write a very long story about a lighthouse keeper.")
    browser.find_element(ID, "chat-send").click()
    reply = ".message.assistant .body"
    wait_until(lambda: len(text(browser, reply)) > 80, timeout=120, interval=0.1, what="streamed text")
    first = len(text(browser, reply))
    wait_until(lambda: len(text(browser, reply)) > first, timeout=30, interval=0.05, what="the text growing")
    browser.find_element(ID, "chat-stop").click()
    wait_text(browser, ".message.assistant .stats", "stopped", timeout=10)
    stopped_at = text(browser, reply)
    # The host's llama-server stops generating (its slot goes idle) — not just the page.
    llama_port = world["a"].runner()["llama"]["port"]
    llama_key = {"Authorization": f"Bearer {read_llama_key(world['a'].home)}"}  # llama-server has runnerd's key
    wait_until(lambda: not any(s.get("is_processing") for s in
                               httpx.get(f"http://127.0.0.1:{llama_port}/slots", headers=llama_key, timeout=5).json()),
               timeout=15, what="llama-server's slot to go idle after stop")
    assert text(browser, reply) == stopped_at
    assert "tok/s" in text(browser, ".message.assistant .stats")
    assert browser.find_element(ID, "chat-send").is_enabled()
    # Markdown and code blocks, through the page's own renderer, escaped.
    html = browser.execute_script("return window.renderMarkdown('**hi** `x`\\n```python\\nprint(1 < 2)\\n```')")
    assert "<strong>hi</strong>" in html and "<code>x</code>" in html and '<pre data-lang="python"><code>print(1 &lt; 2)' in html


def test_chat_streams_and_stop_stops_it(world, browser, artifacts):
    chat_streams_and_stops(world, browser)
    shot(browser, artifacts, "03-chat")
    tab(browser, "mesh")
    wait_text(browser, "#toks-line", "tok/s")


def test_tok_s_covers_requests_from_outside_the_console(world, browser, artifacts):
    """A request through A's API (not the console) shows up in the live view's and meshctl's tok/s."""
    a = world["a"]
    assert a.chat("Count from one to twenty.", max_tokens=24) is not None
    ended = time.time()
    decode = wait_until(lambda: (d := a.runner()["decode"])["at"] >= ended and d, timeout=30,
                        what="runnerd's decode rate read after the API request ended")
    assert decode["tokens"] >= 24 and decode["tok_s"] > 0  # the API request's tokens are in it
    figure = f"{decode['tok_s']:.1f} tok/s ({decode['tokens']} tokens"
    wait_text(browser, "#toks-line", f"Recent requests on this node's llama-server: {figure}", timeout=20)
    assert "from this console" in text(browser, "#toks-line")  # the console's own chats are still listed
    shot(browser, artifacts, "03-mesh-tok-s")
    browser.set_window_size(1280, 1000)
    status = meshctl("status", home=a.home)
    assert f"decode: {decode['tok_s']:.1f} tok/s (recent requests: {decode['tokens']} tokens" in status.stdout


@needs_firefox
def test_firefox_chat_streams_and_stop_stops_it(world, firefox, artifacts):
    chat_streams_and_stops(world, firefox)
    shot(firefox, artifacts, "firefox-03-chat")
    firefox.set_window_size(1280, 1000)
    tab(firefox, "mesh")


def test_bad_model_paths_are_refused_and_change_nothing(world, browser):
    a = world["a"]
    pid, fingerprint = a.service_pid("runnerd"), a.runner()["model"]["fingerprint"]
    tab(browser, "models")
    wait_until(lambda: browser.find_elements(CSS, '#local-models tr[data-file="notes.gguf"]'), timeout=20,
               what="the local models listed")
    default_row = text(browser, f'#local-models tr[data-file="{default_model_path().name}"]')
    assert inspect_gguf(default_model_path()).arch in default_row and "MB" in default_row
    assert "not a GGUF" in text(browser, '#local-models tr[data-file="notes.gguf"]')
    for path, reason in (("/etc/hostname", "not a GGUF file"), (str(world["root"] / "missing.gguf"), "does not exist"),
                         ("", "enter the path"), (str(world["root"]), "not a file")):
        fill(browser, "path-input", path)
        browser.find_element(ID, "path-button").click()
        wait_text(browser, "#model-msg", reason)
    assert a.service_pid("runnerd") == pid and a.runner()["model"]["fingerprint"] == fingerprint


def test_hub_errors_are_clear(world, browser):
    fill(browser, "hub-input", "nobody/nothing-here")
    browser.find_element(ID, "hub-search").click()
    wait_text(browser, "#hub-msg", "no such repo")
    fill(browser, "hub-input", "not a repo")
    browser.find_element(ID, "hub-open").click()
    wait_text(browser, "#hub-msg", "is not a repo name")
    fill(browser, "hub-input", "test/gated-GGUF")  # the console has HF_TOKEN: the gated repo opens
    browser.find_element(ID, "hub-search").click()
    wait_until(lambda: browser.find_elements(CSS, '#hub-files tr[data-file="g.gguf"]'), timeout=20,
               what="the gated repo listed with HF_TOKEN")
    world["hub"].down = True
    try:
        fill(browser, "hub-input", "tiny")
        browser.find_element(ID, "hub-search").click()
        wait_text(browser, "#hub-msg", "cannot reach the Hub", timeout=60)
    finally:
        world["hub"].down = False


def test_download_from_the_hub_and_serve_it(world, browser, artifacts):
    a, models = world["a"], world["models"]
    fill(browser, "hub-input", "tiny-llama")
    browser.find_element(ID, "hub-search").click()
    wait_until(lambda: browser.find_elements(CSS, "#hub-results a"), timeout=20, what="search results")
    browser.find_element(CSS, "#hub-results a").click()
    wait_until(lambda: len(browser.find_elements(CSS, "#hub-files tbody tr")) == 3, timeout=20,
               what="the repo's three GGUF files")
    assert "26.8 MB" in text(browser, '#hub-files tr[data-file="tiny-llama-Q4_0.gguf"]')
    assert "sha256" in text(browser, '#hub-files tr[data-file="tiny-llama-Q4_0.gguf"]')

    def download(file: str) -> None:
        click(browser, f'#hub-files tr[data-file="{file}"] button')

    download("huge-70B-Q8_0.gguf")
    wait_text(browser, '.download[data-file="huge-70B-Q8_0.gguf"]', "not enough disk space")
    download("broken.gguf")
    wait_text(browser, '.download[data-file="broken.gguf"]', "not a GGUF model")
    assert text(browser, '.download[data-file="broken.gguf"] .row:last-child') == "Dismiss"  # retrying cannot help
    assert "Try again" in text(browser, '.download[data-file="huge-70B-Q8_0.gguf"]')
    assert sorted(p.name for p in models.glob("*.gguf")) == sorted([default_model_path().name, "notes.gguf"])

    download("tiny-llama-Q4_0.gguf")
    card = '.download[data-file="tiny-llama-Q4_0.gguf"]'
    wait_until(lambda: "MB/s" in text(browser, card) and "s left" in text(browser, card), timeout=30, interval=0.05,
               what="progress with rate and time left")
    shot(browser, artifacts, "04-models-downloading")
    click(browser, f"{card} button.secondary")  # pause
    wait_text(browser, f"{card} .state", "paused")
    assert not (models / "tiny-llama-Q4_0.gguf").exists()
    click(browser, f"{card} button")  # resume
    wait_text(browser, card, "resumed at")
    wait_text(browser, f"{card} .state", "done", timeout=60)
    assert (models / "tiny-llama-Q4_0.gguf").read_bytes() == world["tiny"].read_bytes()
    shot(browser, artifacts, "05-models-downloaded")

    click(browser, f"{card} button")  # use this model
    wait_text(browser, "#model-msg", "restarted with", timeout=120)
    tiny_fp = inspect_gguf(world["tiny"]).fingerprint
    wait_until(lambda: (a.runner().get("model") or {}).get("fingerprint") == tiny_fp, timeout=60,
               what="A's runnerd on the downloaded model")
    wait_until(a.answers, timeout=120, interval=0.3, what="A serving the downloaded model")
    assert a.chat("Hello", max_tokens=4) is not None
    tab(browser, "mesh")
    wait_until(lambda: "different model" in text(browser, "#exclusions"), timeout=60,
               what="B shown as excluded: it holds another model")
    wait_text(browser, "#llama-line", "llama-server: ready", timeout=120)
    shot(browser, artifacts, "06-mesh-after-model-change")


def phone_width(world, browser, artifacts, prefix: str) -> None:
    browser.set_window_size(390, 844)
    tab(browser, "mesh")
    wait_until(lambda: len(node_rows(browser)) == 2, timeout=30, what="both nodes at phone width")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400, f"the page scrolls sideways at phone width ({width}px)"
    shot(browser, artifacts, prefix + "07-phone-mesh")
    tab(browser, "chat")
    # The conversation is kept while the page is open (across views).
    assert len(browser.find_elements(CSS, "#conversation .message")) == 2
    shot(browser, artifacts, prefix + "08-phone-chat")
    browser.set_window_size(1280, 1000)
    tab(browser, "mesh")


def test_phone_width(world, browser, artifacts):
    phone_width(world, browser, artifacts, "")


@needs_firefox
def test_firefox_phone_width(world, firefox, artifacts):
    phone_width(world, firefox, artifacts, "firefox-")


def test_cross_origin_and_foreign_host_are_refused(world, browser):
    a, url = world["a"], world["url"]
    before = mesh_id(a)
    # A page of another origin (the stand-in's) tries to make the console leave the mesh and read the token.
    browser.get(world["hub"].url + "/api/models")
    outcome = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const post = (path) => fetch(arguments[0] + path, {method: "POST", mode: "no-cors", body: "{}",
                                     headers: {"Content-Type": "text/plain"}}).then(() => "sent", (e) => "blocked: " + e);
        Promise.all([post("/api/leave"), post("/api/token")]).then(done);
    """, url)
    assert len(outcome) == 2
    assert mesh_id(a) == before and a.status()["meshd"]["peers"], "a cross-origin page made the node leave"
    browser.get(url + "/")
    browser.execute_script("window.confirm = () => true")
    # The same from outside the browser, where we can read the answers.
    evil = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    r = httpx.post(url + "/api/leave", headers=evil, content="{}")
    assert r.status_code == 403 and "another origin" in r.json()["error"]
    assert httpx.post(url + "/api/token", headers=evil, content="{}").status_code == 403
    assert httpx.post(url + "/api/join", headers={**evil, "Sec-Fetch-Site": "cross-site"},
                      content='{"token": "x"}').status_code == 403
    rebound = httpx.get(url + "/api/state", headers={"Host": f"evil.example:{url.rsplit(':', 1)[1]}"})
    assert rebound.status_code == 421 and "answers only to" in rebound.json()["error"]
    assert httpx.get(url + "/", headers={"Host": "evil.example"}).status_code == 421
    assert mesh_id(a) == before


def test_leave_then_stop_and_start_the_node(world, browser, artifacts):
    a, b, ids = world["a"], world["b"], world["ids"]
    old = mesh_id(a)
    browser.find_element(ID, "leave").click()
    wait_text(browser, "#invite-msg", "Left the mesh", timeout=20)
    wait_until(lambda: node_rows(browser) == [ids["a"]], timeout=30, what="only A left in the view")
    assert mesh_id(a) != old
    wait_until(lambda: not any(p["announcement"]["node_id"] == ids["a"] for p in b.status()["meshd"]["peers"]),
               timeout=30, what="B forgetting A")
    browser.find_element(ID, "stop-node").click()
    wait_text(browser, "#node-line", "No node is running", timeout=60)
    assert meshctl("status", home=a.home).returncode != 0
    shot(browser, artifacts, "09-node-stopped")
    browser.find_element(ID, "start-solo").click()
    wait_until(lambda: node_rows(browser) == [ids["a"]], timeout=120, what="A back in the view")
    wait_until(a.answers, timeout=120, interval=0.3, what="A serving again")
    assert (a.runner().get("model") or {}).get("fingerprint") == inspect_gguf(world["tiny"]).fingerprint
    assert a.status()["gatewayd"]["api_url"].endswith(f":{a.port}/v1")  # the restart kept A's settings


def test_api_key_prompt(tmp_path):
    port = free_port()
    console = subprocess.Popen([sys.executable, "-m", "meshctl.cli", "console", "--home", str(tmp_path / "k"),
                                "--port", str(port), "--no-open", "--api-key", "open-sesame"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    driver = chromium()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _get(url + "/"), timeout=30, what="the keyed console")
        assert httpx.get(url + "/api/state").status_code == 401
        driver.get(url + "/")
        wait_until(lambda: driver.find_element(ID, "keyprompt").is_displayed(), timeout=30, what="the key prompt")
        fill(driver, "key-input", "open-sesame")
        driver.find_element(CSS, "#key-form button").click()
        wait_until(lambda: text(driver, "#live") == "live", timeout=30, what="the page live with the key")
        wait_text(driver, "#node-line", "No node is running")  # the first pushed state, read with the key
    finally:
        driver.quit()
        kill_process_tree(console)
    refused = subprocess.run([sys.executable, "-m", "meshctl.cli", "console", "--home", str(tmp_path / "k"), "--host",
                              "0.0.0.0", "--port", str(free_port()), "--no-open"], capture_output=True, text=True,
                             timeout=30, env={k: v for k, v in os.environ.items() if not k.startswith("MESH_")})
    assert refused.returncode == 2 and "--api-key" in refused.stderr and "Traceback" not in refused.stderr
