// End-to-end: the official sora-js-sdk from npm, in Debian's headless
// Chromium driven by playwright-core, against a real hato binary.
// Runs inside a network namespace made by tests/run, so every ICE
// candidate is loopback or a documentation-range address.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile, execFileSync, execSync } from "node:child_process";
import { promisify } from "node:util";
import { createServer } from "node:http";
import https from "node:https";
import { readFileSync, writeFileSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import os from "node:os";
import net from "node:net";
import { fileURLToPath, pathToFileURL } from "node:url";
import { createHmac } from "node:crypto";
import path from "node:path";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const hatoBin = process.env.HATO_BIN ?? path.join(here, "../../target/release/hato");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";

const freePort = () =>
  new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

let hato, web, hook, browser, signalingUrl, apiUrl, pageUrl;
// A second hato over TLS, with a certificate made here (openssl) that
// Chromium is told to trust by its public key.
let hatoTls, tlsSignalingUrl, tlsApiPort, certPem;
let hatoLog = "";
// What the auth webhook was asked: every connect of these tests goes
// through it; a connect whose metadata says deny is refused.
const hookCalls = [];
// Access tokens for the first hato: HS256, made here as a backend would.
const jwtSecret = "the e2e tests' secret, 32 bytes or more";
const accessToken = (claims) => {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", jwtSecret).update(body).digest("base64url")}`;
};

before(async () => {
  const [sig, api] = [await freePort(), await freePort()];
  signalingUrl = `ws://127.0.0.1:${sig}/signaling`;
  apiUrl = `http://127.0.0.1:${api}/`;
  hook = createServer((req, res) => {
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      const asked = JSON.parse(body);
      hookCalls.push(asked);
      const answer = asked.metadata?.deny
        ? { allowed: false, reason: "NOT-ON-THE-LIST" }
        : { allowed: true };
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(answer));
    });
  });
  await new Promise((r) => hook.listen(0, "127.0.0.1", r));
  const hookUrl = `http://127.0.0.1:${hook.address().port}/auth`;
  hato = spawn(hatoBin, [
    "--signaling-addr", `127.0.0.1:${sig}`, "--api-addr", `127.0.0.1:${api}`,
    "--auth-webhook-url", hookUrl, "--history-size", "100", "--auth-jwt-secret", jwtSecret,
  ], {
    env: { ...process.env, HATO_LOG: "hato=debug" },
  });
  hato.stdout.on("data", (d) => (hatoLog += d));
  hato.stderr.on("data", (d) => (hatoLog += d));
  const page = readFileSync(path.join(here, "page.html"));
  const sdk = readFileSync(path.join(here, "node_modules/sora-js-sdk/dist/sora.js"));
  web = createServer((req, res) => {
    const [type, body] = req.url === "/sora.js" ? ["text/javascript", sdk] : ["text/html", page];
    res.writeHead(200, { "content-type": type }).end(body);
  });
  await new Promise((r) => web.listen(0, "127.0.0.1", r));
  pageUrl = `http://127.0.0.1:${web.address().port}/`;
  const dir = mkdtempSync(path.join(os.tmpdir(), "hato-tls-"));
  const [certFile, keyFile] = [path.join(dir, "cert.pem"), path.join(dir, "key.pem")];
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
    "-keyout", keyFile, "-out", certFile,
  ], { stdio: "ignore" });
  certPem = readFileSync(certFile, "utf8");
  const spki = execSync(
    `openssl x509 -pubkey -noout -in ${certFile} | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64`,
  ).toString().trim();
  const [tsig, tapi] = [await freePort(), await freePort()];
  tlsSignalingUrl = `wss://127.0.0.1:${tsig}/signaling`;
  tlsApiPort = tapi;
  hatoTls = spawn(hatoBin, [
    "--signaling-addr", `127.0.0.1:${tsig}`, "--api-addr", `127.0.0.1:${tapi}`,
    "--rtc-addr", "127.0.0.1:0", "--tls-cert", certFile, "--tls-key", keyFile,
  ], { env: { ...process.env, HATO_LOG: "hato=debug" } });
  hatoTls.stdout.on("data", (d) => (hatoLog += d));
  hatoTls.stderr.on("data", (d) => (hatoLog += d));
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: [
      `--ignore-certificate-errors-spki-list=${spki}`,
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--allow-loopback-in-peer-connection",
    ],
  });
  // Wait until hato answers.
  for (let i = 0; i < 100; i++) {
    try {
      await fetch(apiUrl, { method: "POST" });
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw new Error(`hato did not start:\n${hatoLog}`);
});

after(async () => {
  await browser?.close();
  web?.close();
  hook?.close();
  hato?.kill("SIGINT");
  hatoTls?.kill("SIGINT");
  // hato's own log, for reading after a failure.
  if (process.env.HATO_E2E_LOG) writeFileSync(process.env.HATO_E2E_LOG, hatoLog);
});

const push = async (target, body) => {
  const res = await fetch(apiUrl, {
    method: "POST",
    headers: { "x-sora-target": target, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  assert.equal(res.status, 200, text);
  return JSON.parse(text);
};

/** A page with the SDK loaded. */
const openPage = async () => {
  const page = await browser.newPage();
  page.on("console", (m) => m.type() === "error" && console.log("browser:", m.text()));
  await page.goto(pageUrl);
  await page.waitForFunction(() => typeof window.start === "function");
  return page;
};

/** Opens a page, connects with `options`, returns the page and connection id. */
const connect = async (channelId, options, metadata = null, url = signalingUrl) => {
  const page = await openPage();
  const id = await page.evaluate(([u, c, o, m]) => window.start(u, c, o, m), [url, channelId, options, metadata]);
  await page.waitForFunction(() => window.events.some((e) => e.kind === "connected"), null, { timeout: 10000 });
  return { page, id };
};

const events = (page, kind) => page.evaluate((k) => window.events.filter((e) => e.kind === k), kind);

const waitPush = async (page, n = 1) => {
  await page.waitForFunction((n) => window.events.filter((e) => e.kind === "push").length >= n, n, { timeout: 10000 });
  return events(page, "push");
};

/** disconnect() completes, with no abnormal-close event. */
const disconnectCleanly = async (page) => {
  await page.evaluate(() => window.recvonly.disconnect());
  const abends = (await events(page, "disconnect")).filter((e) => e.type === "abend");
  assert.deepEqual(abends, [], "no abnormal close");
  await page.close();
};

test("WebSocket signaling: PushChannel arrives with transport websocket", async () => {
  const { page, id } = await connect("js-ws", { dataChannelSignaling: false });
  assert.equal(id.length, 26);
  const echoed = await push("Sora_20160711.PushChannel", { channel_id: "js-ws", data: { hello: "ws" } });
  assert.deepEqual(echoed, { data: { hello: "ws" }, type: "push" });
  const [got] = await waitPush(page);
  assert.deepEqual([got.data, got.transportType], [{ hello: "ws" }, "websocket"]);
  await push("Sora_20160711.PushConnection", { channel_id: "js-ws", connection_id: id, data: { to: "me" } });
  const [, second] = await waitPush(page, 2);
  assert.deepEqual(second.data, { to: "me" });
  await disconnectCleanly(page);
});

test("DataChannel signaling: the push arrives with transport datachannel", async () => {
  const { page } = await connect("js-dc", { dataChannelSignaling: true, ignoreDisconnectWebSocket: false });
  await page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
  await push("Sora_20160711.PushChannel", { channel_id: "js-dc", data: { hello: "dc" } });
  const [got] = await waitPush(page);
  assert.deepEqual([got.data, got.transportType], [{ hello: "dc" }, "datachannel"]);
  await disconnectCleanly(page);
});

test("ignoreDisconnectWebSocket: a push after the WebSocket closed still arrives", async () => {
  const { page } = await connect("js-ig", { dataChannelSignaling: true, ignoreDisconnectWebSocket: true });
  await page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
  const [sw] = await events(page, "switched");
  assert.equal(sw.ignore, true);
  // The SDK closes its WebSocket on switched; give hato time to see it.
  await new Promise((r) => setTimeout(r, 500));
  await push("Sora_20201120.PushChannelByRole", { channel_id: "js-ig", role: "recvonly", data: { after: "ws-closed" } });
  const [got] = await waitPush(page);
  assert.deepEqual([got.data, got.transportType], [{ after: "ws-closed" }, "datachannel"]);
  await disconnectCleanly(page);
});

test("consent: an idle Chromium peer's checks are answered and it stays connected, then takes a push", async () => {
  const { page } = await connect("js-idle", { dataChannelSignaling: true, ignoreDisconnectWebSocket: true });
  await page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
  // Chromium counts a response to its check only once it passes
  // MESSAGE-INTEGRITY; hato answers a connected peer's checks in its shard.
  const answered = () =>
    page.evaluate(async () => {
      const stats = await window.recvonly.pc.getStats();
      let n = 0;
      stats.forEach((s) => {
        if (s.type === "candidate-pair" && s.nominated) n += s.responsesReceived;
      });
      return [n, window.recvonly.pc.iceConnectionState];
    });
  const [before] = await answered();
  await new Promise((r) => setTimeout(r, 12000));
  const [after, state] = await answered();
  assert.ok(after - before >= 3, `${after - before} checks answered in 12 s`);
  assert.equal(state, "connected");
  await push("Sora_20160711.PushChannel", { channel_id: "js-idle", data: { after: "idle" } });
  const [got] = await waitPush(page);
  assert.deepEqual([got.data, got.transportType], [{ after: "idle" }, "datachannel"]);
  await disconnectCleanly(page);
});

test("recovery: the app reads the offset in its push callback, reconnects with it in metadata, and gets what it missed", async () => {
  const options = { dataChannelSignaling: true, ignoreDisconnectWebSocket: true };
  const first = await connect("js-rec", options);
  await first.page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
  await push("Sora_20160711.PushChannel", { channel_id: "js-rec", data: { n: 1 } });
  const [seen] = await waitPush(first.page);
  assert.deepEqual(seen.data, { n: 1 });
  assert.equal(seen.hato.offset, 1);
  await disconnectCleanly(first.page);
  // Pushed while the app is away.
  await push("Sora_20160711.PushChannel", { channel_id: "js-rec", data: { n: 2 } });
  await push("Sora_20160711.PushChannel", { channel_id: "js-rec", data: { n: 3 } });
  const again = await connect("js-rec", options, { hato_recover: { epoch: seen.hato.epoch, offset: seen.hato.offset } });
  const got = await waitPush(again.page, 3);
  assert.deepEqual(got[0].data, {});
  assert.equal(got[0].hato.recovery.complete, true);
  assert.deepEqual(got.slice(1).map((p) => [p.data, p.hato.offset]), [[{ n: 2 }, 2], [{ n: 3 }, 3]]);
  await disconnectCleanly(again.page);
});

test("access token: a connect with metadata.access_token is accepted by hato itself and receives a push", async () => {
  const calls = hookCalls.length;
  const exp = Math.floor(Date.now() / 1000) + 60;
  const token = accessToken({ channel_id: "js-jwt", exp, client_id: "from-token" });
  const { page } = await connect("js-jwt", { dataChannelSignaling: true, ignoreDisconnectWebSocket: false }, { access_token: token });
  assert.equal(hookCalls.length, calls, "a valid token skips the auth webhook");
  await page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
  await push("Sora_20160711.PushClient", { channel_id: "js-jwt", client_id: "from-token", data: { token: "ok" } });
  const [got] = await waitPush(page);
  assert.deepEqual(got.data, { token: "ok" });
  await disconnectCleanly(page);
});

test("auth webhook: a denied connect() is rejected with the webhook's reason, an allowed one gets a push", async () => {
  const denied = await openPage();
  const refusal = await denied
    .evaluate(([u]) => window.start(u, "js-auth", { dataChannelSignaling: false }, { deny: true }), [signalingUrl])
    .then(() => "connected", (e) => String(e.message ?? e));
  assert.match(refusal, /4490/);
  assert.match(refusal, /NOT-ON-THE-LIST/);
  await denied.close();
  const { page } = await connect("js-auth", { dataChannelSignaling: true, ignoreDisconnectWebSocket: true }, { token: "ok" });
  const asked = hookCalls.filter((c) => c.channel_id === "js-auth");
  assert.deepEqual(asked.map((c) => c.metadata), [{ deny: true }, { token: "ok" }]);
  assert.match(asked[1].sora_client.raw, /Sora JavaScript SDK/);
  await page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
  await push("Sora_20160711.PushChannel", { channel_id: "js-auth", data: { allowed: "in" } });
  const [got] = await waitPush(page);
  assert.deepEqual([got.data, got.transportType], [{ allowed: "in" }, "datachannel"]);
  await disconnectCleanly(page);
});

/** A push over https to the TLS hato, trusting only the test's certificate. */
const pushTls = (body) =>
  new Promise((resolve, reject) => {
    const req = https.request(
      {
        host: "127.0.0.1", port: tlsApiPort, method: "POST", path: "/", ca: certPem,
        headers: { "x-sora-target": "Sora_20160711.PushChannel", "content-type": "application/json" },
      },
      (res) => {
        let text = "";
        res.on("data", (d) => (text += d));
        res.on("end", () => resolve([res.statusCode, text]));
      },
    );
    req.on("error", reject);
    req.end(JSON.stringify(body));
  });

test("TLS: the SDK connects over wss:// and receives a push sent over https://", async () => {
  // hato may still be starting.
  for (let i = 0; i < 100; i++) {
    try {
      await pushTls({ channel_id: "warmup", data: {} });
      break;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const { page } = await connect("js-tls", { dataChannelSignaling: true, ignoreDisconnectWebSocket: false }, null, tlsSignalingUrl);
  await page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
  const [status, text] = await pushTls({ channel_id: "js-tls", data: { secure: true } });
  assert.equal(status, 200, text);
  const [got] = await waitPush(page);
  assert.deepEqual([got.data, got.transportType], [{ secure: true }, "datachannel"]);
  await disconnectCleanly(page);
});

test("demo page: connects as a WebRTC peer and shows a push it sends, with its transport", async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  // The page loads and runs without a console error (a missing favicon is one).
  const errors = [];
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${apiUrl}demo`);
  await page.fill("#channel", "js-demo");
  await page.click("#connect");
  await page.waitForFunction(() => document.querySelector("#status").textContent.includes("switched"), null, { timeout: 10000 });
  await page.fill("#data", '{"message": "hello from the demo"}');
  await page.click("#send");
  await page.waitForSelector('.event[data-kind="push"][data-transport="datachannel"]', { timeout: 10000 });
  const shown = await page.textContent('.event[data-kind="push"] pre');
  assert.match(shown, /hello from the demo/);
  assert.match(await page.textContent("#answer"), /^200 · recipients 1/);
  // A push from outside the page, with curl, shows up the same way.
  execFileSync("curl", ["-sf", apiUrl, "-H", "x-sora-target: Sora_20160711.PushChannel",
    "-d", JSON.stringify({ channel_id: "js-demo", data: { from: "curl" } })]);
  await page.waitForFunction(() => [...document.querySelectorAll('.event[data-kind="push"][data-transport="datachannel"] pre')]
    .some((p) => p.textContent.includes("curl")), null, { timeout: 10000 });
  await page.waitForFunction(() => document.querySelector("#conns").textContent.includes("datachannel"), null, { timeout: 10000 });
  if (process.env.HATO_DEMO_SCREENSHOT) await page.screenshot({ path: process.env.HATO_DEMO_SCREENSHOT });
  await page.click("#connect");
  await page.close();
  assert.deepEqual(errors, [], "the demo page logged errors");
});

test("load report: hato-load's HTML report, and its comparison of two runs, draw every plot with data and need no network", async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "hato-report-"));
  const load = path.join(path.dirname(hatoBin), "hato-load");
  // Not execFileSync: this process answers hato's auth webhook meanwhile.
  const run = (args) => promisify(execFile)(load, args, { timeout: 60000 });
  const pushRun = (name, extra) => run([
    "--signaling-url", signalingUrl, "--api-url", apiUrl, "--channel", `report-${name}`,
    "--peers", "20", "--hatch-rate", "40", "--duration", "3", "--rate", "20", "--settle", "1",
    "--drain", "1", "--server-pid", String(hato.pid), "--max-lost", "0",
    "--json", path.join(dir, `${name}.json`), ...extra,
  ]);
  await pushRun("before", ["--report", path.join(dir, "before.html")]);
  await pushRun("after", ["--data-channel-signaling", "--ignore-disconnect-websocket", "--processes", "2"]);
  await run(["--compare", path.join(dir, "before.json"), path.join(dir, "after.json"),
    "--report", path.join(dir, "compare.html")]);
  for (const [file, runs] of [["before.html", 1], ["compare.html", 2]]) {
    const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
    const errors = [];
    const fetched = [];
    page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("request", (r) => fetched.push(r.url()));
    const url = pathToFileURL(path.join(dir, file)).href;
    await page.goto(url);
    const charts = await page.$$eval("svg.chart", (svgs) => svgs.map((s) => ({
      id: s.id,
      points: Number(s.dataset.points),
      // Lines the browser laid out with a length, and the box they sit in.
      drawn: [...s.querySelectorAll("path.series")].filter((p) => p.getTotalLength() > 0).length,
      width: s.getBoundingClientRect().width,
    })));
    assert.equal(charts.length, 8, `${file}: ${JSON.stringify(charts)}`);
    for (const c of charts) {
      assert.ok(c.points > 0 && c.drawn >= runs && c.width > 0, `${file}: ${c.id} drew no data: ${JSON.stringify(c)}`);
    }
    // The figures table has one column per run, and the second run's deliveries.
    const received = await page.$$eval("#figures tr", (rows) => rows
      .find((r) => r.cells[0]?.textContent === "deliveries received")
      ?.querySelectorAll("td.n").length);
    assert.equal(received, runs === 2 ? 3 : 1, `${file}: figures table`);
    assert.deepEqual(fetched.filter((u) => u !== url), [], `${file} fetched something`);
    assert.deepEqual(errors, [], `${file} logged errors`);
    await page.close();
  }
  const after = JSON.parse(readFileSync(path.join(dir, "after.json"), "utf8"));
  // The workers' series are merged: 20 peers connected across 2 processes.
  assert.equal(Math.max(...after.series.connected), 20);
  assert.ok(after.series.deliveries_per_second.some((n) => n > 0));
  rmSync(dir, { recursive: true, force: true });
});

test("cluster: the SDK connected to node B receives a push sent to node A's API", async () => {
  const natsBin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"].find((p) => {
    try { execFileSync("test", ["-x", p]); return true; } catch { return false; }
  }) ?? "nats-server";
  // nats-server and the nodes pick their own ports (and say which): ports
  // picked here as "free" could be picked twice before anyone binds them.
  const natsDir = mkdtempSync(path.join(os.tmpdir(), "hato-nats-"));
  const nats = spawn(natsBin, ["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", natsDir], { stdio: "ignore" });
  let natsUrl;
  for (let i = 0; !natsUrl; i++) {
    const file = readdirSync(natsDir)[0];
    try {
      if (file) natsUrl = JSON.parse(readFileSync(path.join(natsDir, file), "utf8")).nats?.[0];
    } catch { /* still being written */ }
    assert.ok(i < 100, "nats-server writes its ports file");
    if (!natsUrl) await new Promise((r) => setTimeout(r, 100));
  }
  const nodes = [];
  try {
    const node = (name, extra = [], signalingAddr = "127.0.0.1:0") => new Promise((resolve, reject) => {
      const p = spawn(hatoBin, [
        "--signaling-addr", signalingAddr, "--api-addr", "127.0.0.1:0", "--rtc-addr", "127.0.0.1:0",
        "--cluster-nats-url", natsUrl, "--node-name", name, ...extra,
      ], { env: { ...process.env, HATO_LOG: "hato=debug", NO_COLOR: "1" } });
      nodes.push(p);
      let out = "";
      p.stderr.on("data", (d) => (hatoLog += d));
      p.stdout.on("data", (d) => {
        hatoLog += d;
        out += d;
        const m = out.match(/hato is serving signaling=(\S+) api=(\S+)/);
        if (m) resolve({ signaling: m[1], api: m[2] });
      });
      p.on("exit", (code) => reject(new Error(`node ${name} exited (${code}) before serving`)));
    });
    // Node B says where clients reach it, for node A's redirects.
    const bPort = await freePort();
    const bUrl = `ws://127.0.0.1:${bPort}/signaling`;
    const [a, b] = [
      await node("node-a"),
      await node("node-b", ["--public-signaling-url", bUrl], `127.0.0.1:${bPort}`),
    ];
    const post = async (url, target, body) => {
      const res = await fetch(url, { method: "POST", headers: { "x-sora-target": target }, body: JSON.stringify(body) });
      return [res.status, await res.text()];
    };
    // Both nodes up and each in the other's view (GetStatsReport lists them).
    for (let i = 0; ; i++) {
      const seen = await Promise.all([a, b].map((n) => post(n.api, "Sora_20171010.GetStatsReport", {})
        .then(([s, t]) => (s === 200 ? JSON.parse(t).cluster : `status ${s}`), (e) => String(e))));
      if (seen.every((c) => c?.other_nodes?.length === 1)) break;
      assert.ok(i < 200, `the two nodes find each other: ${JSON.stringify(seen)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const { page, id } = await connect("js-cluster", { dataChannelSignaling: true, ignoreDisconnectWebSocket: true }, null, b.signaling);
    await page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
    // Node A lists the peer connected to node B.
    for (let i = 0; ; i++) {
      const [s, t] = await post(a.api, "Sora_20201013.ListChannelConnections", { channel_id: "js-cluster" });
      assert.equal(s, 200, t);
      const list = JSON.parse(t);
      if (list.length === 1) {
        assert.deepEqual([list[0].connection_id, list[0].node_name], [id, "node-b"]);
        break;
      }
      assert.ok(i < 100, "node A lists the peer on node B");
      await new Promise((r) => setTimeout(r, 100));
    }
    const [status, text] = await post(a.api, "Sora_20160711.PushChannel", { channel_id: "js-cluster", data: { via: "node-a" } });
    assert.equal(status, 200, text);
    const [got] = await waitPush(page);
    assert.deepEqual([got.data, got.transportType], [{ via: "node-a" }, "datachannel"]);
    await disconnectCleanly(page);

    // Node A drains: the SDK's connect to it follows the redirect to node B
    // and receives a push sent to node A.
    const [ds, dt] = await post(a.api, "Hato_20261201.Drain", {});
    assert.equal(ds, 200, dt);
    await new Promise((r) => setTimeout(r, 1500)); // a heartbeat of B's, with its URL
    const moved = await connect("js-drain", { dataChannelSignaling: true, ignoreDisconnectWebSocket: true }, null, a.signaling);
    await moved.page.waitForFunction(() => window.events.some((e) => e.kind === "switched"), null, { timeout: 10000 });
    for (let i = 0; ; i++) {
      const [s, t] = await post(b.api, "Sora_20201013.ListChannelConnections", { channel_id: "js-drain" });
      if (s === 200 && JSON.parse(t).some((c) => c.connection_id === moved.id && c.node_name === "node-b")) break;
      assert.ok(i < 100, `the redirected peer is on node B: ${t}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const [ps, pt] = await post(a.api, "Sora_20160711.PushChannel", { channel_id: "js-drain", data: { via: "drained-a" } });
    assert.equal(ps, 200, pt);
    const [after] = await waitPush(moved.page);
    assert.deepEqual(after.data, { via: "drained-a" });
    await disconnectCleanly(moved.page);
  } finally {
    for (const p of nodes) p.kill("SIGINT");
    nats.kill();
    rmSync(natsDir, { recursive: true, force: true });
  }
});
