#!/usr/bin/env python3
"""Browser test of the playground page that unmask-gateway serves at /.

Starts the real unmaskd (bundled model, real plugins) on an ipc socket in a temporary
folder and the real unmask-gateway on 127.0.0.1 with a free port. Then it drives
headless Chromium through chromedriver's WebDriver HTTP API with urllib only. It loads
the page, checks that the policies come from the daemon's info, types a prompt and clicks
Generate. It saves a screenshot of the canvas halfway through the unmasking, waits for
the final text, and compares it with the daemon's own result for the same request.
Screenshots go to UM_TEST_OUT (tests/out under the build folder).

make check runs it with the paths in the environment (see Makefile.am). Exit status 77
(skip) when Chromium or chromedriver is missing, except under CI=true, where the CI
script installs both and a missing browser is a failure.
"""
import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SKIP = 77
PROMPT = "once upon a time, there was a little girl named lily. she"
GEN_LENGTH = 96
STEPS = 96
BLOCK_LENGTH = 32
SEED = 7
# Milliseconds per step of the page's replay, so a screenshot catches the canvas
# half unmasked however fast the model runs (96 steps take about 12 s to show).
PACE_MS = 120
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element key


def fail(message):
    print(f"playground: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def env(name):
    value = os.environ.get(name)
    if not value:
        fail(f"{name} is not set: run this test through make check")
    return value


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method, url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_for(what, check, timeout_s, interval_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    fail(f"timed out after {timeout_s} s waiting for {what}")


class WebDriver:
    """The few W3C WebDriver commands this test needs, over chromedriver's HTTP API."""

    def __init__(self, base, chromium, profile):
        self.base = base
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000",
                         "--hide-scrollbars", f"--user-data-dir={profile}"],
            },
        }}}
        status, reply = http_json("POST", f"{base}/session", caps, timeout=120)
        if status != 200:
            fail(f"chromedriver could not start Chromium: {reply}")
        self.session = reply["value"]["sessionId"]

    def cmd(self, method, path, body=None):
        status, reply = http_json(method, f"{self.base}/session/{self.session}{path}", body)
        if status != 200:
            fail(f"WebDriver {method} {path} failed ({status}): {reply}")
        return reply["value"]

    def get(self, url):
        self.cmd("POST", "/url", {"url": url})

    def find(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type_into(self, css, text):
        element = self.find(css)
        self.cmd("POST", f"/element/{element}/clear", {})
        self.cmd("POST", f"/element/{element}/value", {"text": text})

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.cmd("GET", "/screenshot")))

    def quit(self):
        http_json("DELETE", f"{self.base}/session/{self.session}")


def start_gateway(gateway, endpoint, log):
    proc = subprocess.Popen([gateway, "--connect", endpoint, "--port", "0", "--log-level", "debug"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready:
        fail("unmask-gateway printed no URL within 30 s")
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        fail(f"unmask-gateway printed {url!r} instead of its URL")
    return proc, url


def daemon_result(url, body):
    """The done reply of the same generate request, read from /api/generate directly."""
    req = urllib.request.Request(url + "api/generate", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    done = None
    with urllib.request.urlopen(req, timeout=120) as resp:
        event = None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "done":
                done = json.loads(line[6:])
    if not done:
        fail("/api/generate ended without a done event")
    return done


def check_policy_params(driver, info):
    """Each policy shows one input per parameter of its spec, set to the default."""
    for policy in info["plugins"]["remask"]:
        driver.js("const m = document.getElementById('remasking'); m.value = arguments[0];"
                  "m.dispatchEvent(new Event('change'))", policy["name"])
        shown = driver.js("return [...document.querySelectorAll('#policy-params [data-param]')]"
                          ".map(el => [el.dataset.param, el.type === 'checkbox' ? el.checked"
                          " : el.value])")
        want = [spec["name"] for spec in policy["params"]]
        if [name for name, _ in shown] != want:
            fail(f"policy {policy['name']} shows inputs {shown}, its spec lists {want}")
        for (name, value), spec in zip(shown, policy["params"]):
            default = spec.get("default")
            if spec["type"] in ("number", "integer") and default is not None \
                    and float(value) != float(default):
                fail(f"{policy['name']}.{name} shows {value!r}, its default is {default}")
    driver.js("const m = document.getElementById('remasking'); m.value = 'low_confidence';"
              "m.dispatchEvent(new Event('change'))")
    with_params = sum(1 for p in info["plugins"]["remask"] if p["params"])
    print(f"playground: the inputs of {len(info['plugins']['remask'])} policies match their "
          f"specs ({with_params} with parameters)")


def run_page_checks(driver, url, out):
    driver.get(url)
    wait_for("the page to read /api/info", lambda: driver.js(
        "return document.body.dataset.state") == "idle", 60)

    policies = driver.js("return [...document.querySelectorAll('#remasking option')]"
                         ".map(o => o.value)")
    _, info = http_json("GET", url + "api/info")
    expected = [p["name"] for p in info["plugins"]["remask"]]
    if sorted(policies) != sorted(expected):
        fail(f"the policy menu shows {policies}, the daemon's info lists {expected}")
    if driver.js("return document.getElementById('remasking').value") != "low_confidence":
        fail("the policy menu does not start on the daemon's default, low_confidence")
    check_policy_params(driver, info)

    driver.type_into("#prompt", PROMPT)
    for field, value in (("gen_length", GEN_LENGTH), ("steps", STEPS),
                         ("block_length", BLOCK_LENGTH), ("seed", SEED)):
        driver.type_into(f"#{field}", str(value))
    driver.js("const p = document.getElementById('pace'); p.value = arguments[0];"
              "p.dispatchEvent(new Event('input'))", str(PACE_MS))
    driver.click("#generate")

    half = STEPS // 2
    wait_for("the canvas to reach half of the steps", lambda: int(driver.js(
        "return document.getElementById('canvas').dataset.step")) >= half, 120, 0.02)
    mid = os.path.join(out, "playground-mid.png")
    driver.screenshot(mid)
    masked, committed = driver.js(
        "return [document.querySelectorAll('#canvas .cell.masked').length,"
        " document.querySelectorAll('#canvas .cell:not(.masked)').length]")
    if not (0 < masked < GEN_LENGTH and 0 < committed < GEN_LENGTH):
        fail(f"mid-generation canvas has {masked} masked and {committed} committed cells")
    print(f"playground: mid-generation screenshot {mid} ({committed} committed, "
          f"{masked} masked)")

    wait_for("the final text", lambda: driver.js(
        "return document.body.dataset.state") in ("done", "error"), 120)
    state = driver.js("return document.body.dataset.state")
    if state != "done":
        fail("the page shows an error: " + driver.js(
            "return document.getElementById('error').textContent"))
    final = driver.js("return document.getElementById('final-text').textContent")
    driver.screenshot(os.path.join(out, "playground-done.png"))

    body = {"prompt": PROMPT, "gen_length": GEN_LENGTH, "steps": STEPS,
            "block_length": BLOCK_LENGTH, "seed": SEED, "temperature": 0,
            "cfg_scale": 0, "remasking": "low_confidence"}
    done = daemon_result(url, body)
    if final != PROMPT + done["text"]:
        fail(f"final text {final!r} differs from the daemon's {PROMPT + done['text']!r}")
    stats = driver.js("return document.getElementById('final-stats').textContent")
    if "tokens/s" not in stats or "ms/step" not in stats:
        fail(f"final stats lack timing: {stats!r}")
    print(f"playground: final text matches the daemon's ({len(done['text'])} bytes); {stats}")

    # An invalid setting: the page shows the gateway's 400 and marks the field.
    driver.type_into("#gen_length", "0")
    driver.click("#generate")
    wait_for("the error for gen_length 0", lambda: driver.js(
        "return document.body.dataset.state") == "error", 30)
    error = driver.js("return document.getElementById('error').textContent")
    if "gen_length" not in error or not driver.js(
            "return document.getElementById('gen_length').classList.contains('invalid')"):
        fail(f"the error for gen_length 0 does not name and mark the field: {error!r}")
    print("playground: gen_length 0 shows the error and marks the field")


def main():
    daemon, gateway = env("UM_TEST_DAEMON"), env("UM_TEST_GATEWAY")
    model, plugins, out = env("UM_TEST_MODEL"), env("UM_TEST_PLUGINS"), env("UM_TEST_OUT")
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        message = ("playground: SKIP: headless Chromium is not installed (install the Debian "
                   "packages chromium and chromium-driver to run the page test)")
        if os.environ.get("CI") == "true":
            fail(message + "; CI must install them")
        print(message)
        return SKIP

    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="unmask-playground-")
    endpoint = f"ipc://{tmp}/unmaskd.sock"
    procs = []
    driver = None
    logs = {name: open(os.path.join(out, f"playground-{name}.log"), "w")
            for name in ("daemon", "gateway", "chromedriver")}
    try:
        procs.append(subprocess.Popen(
            [daemon, "--model", model, "--plugin-dir", plugins, "--bind", endpoint,
             "--threads", "1", "--log-level", "debug"],
            stdout=subprocess.DEVNULL, stderr=logs["daemon"]))
        gw, url = start_gateway(gateway, endpoint, logs["gateway"])
        procs.append(gw)
        wait_for("unmaskd to serve through the gateway",
                 lambda: http_json("GET", url + "api/health")[0] == 200, 60, 0.2)

        port = free_port()
        procs.append(subprocess.Popen([driver_bin, f"--port={port}"], stdout=logs["chromedriver"],
                                      stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        wait_for("chromedriver", lambda: _ready(base), 30, 0.2)
        driver = WebDriver(base, chromium, os.path.join(tmp, "profile"))
        run_page_checks(driver, url, out)
    finally:
        if driver:
            driver.quit()
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("playground: 1 passed, 0 failed")
    return 0


def _ready(base):
    try:
        return http_json("GET", f"{base}/status", timeout=2)[1]["value"]["ready"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
