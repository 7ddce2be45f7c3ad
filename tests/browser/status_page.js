// The controller's status page in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; no browser is downloaded). Run by crates/sqlrs/tests/status_page.rs.
//
//   node status_page.js URL TOKEN STATE_ID PRESENCE SCREENSHOT
//
// (or STATUS_URL, STATUS_TOKEN, STATUS_STATE_ID, STATUS_PRESENCE, STATUS_SCREENSHOT). Signs
// in with TOKEN, finds the row of STATE_ID and its PRESENCE text, checks the session cookie is
// HttpOnly and out of the page's reach, checks the chart, saves a full-page screenshot, and
// prints one JSON line. Exits 1 with a message on any failure.
'use strict';

const fs = require('fs');
const path = require('path');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function arg(i, env) {
  const v = process.argv[2 + i] || process.env[env];
  if (!v) {
    fail(`missing argument ${i + 1} (or ${env}); usage: node status_page.js URL TOKEN STATE_ID PRESENCE SCREENSHOT`);
  }
  return v;
}

function fail(message) {
  process.stderr.write(`status_page.js: ${message}\n`);
  process.exit(1);
}

function check(ok, message) {
  if (!ok) throw new Error(message);
}

async function main() {
  const url = arg(0, 'STATUS_URL');
  const token = arg(1, 'STATUS_TOKEN');
  const stateId = arg(2, 'STATUS_STATE_ID');
  const presence = arg(3, 'STATUS_PRESENCE');
  const screenshot = arg(4, 'STATUS_SCREENSHOT');

  let chromium;
  try {
    ({ chromium } = require('playwright-core'));
  } catch (e) {
    fail(`playwright-core is missing (${e.code || e.message}): run scripts/setup.sh`);
  }
  if (!fs.existsSync(CHROMIUM)) fail(`${CHROMIUM} is missing: run scripts/setup.sh`);

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-background-networking'],
  });
  const steps = [];
  let failure = null;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();

    const first = await page.goto(url, { waitUntil: 'load' });
    check(first && first.ok(), `GET ${url}: HTTP ${first && first.status()}`);
    const field = page.locator('form#login input[name="token"][type="password"]');
    check((await field.count()) === 1, 'no login form with a password field before signing in');
    check((await page.locator(`[data-state-id="${stateId}"]`).count()) === 0,
      'the state is shown before signing in');
    steps.push('login form');

    await field.fill(token);
    await Promise.all([
      page.waitForURL((u) => u.pathname === '/', { waitUntil: 'load' }),
      page.locator('form#login button[type="submit"]').click(),
    ]);
    check((await page.locator('form#login').count()) === 0,
      `still on the login form after signing in: ${await page.locator('.error').allTextContents()}`);
    steps.push('signed in');

    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === 'taidon_session');
    check(session, `no taidon_session cookie (cookies: ${cookies.map((c) => c.name).join(', ')})`);
    check(session.httpOnly, 'the session cookie is not HttpOnly');
    check(session.sameSite === 'Strict', `the session cookie is SameSite=${session.sameSite}`);
    const visible = await page.evaluate(() => document.cookie);
    check(!visible.includes(token), 'document.cookie holds the token');
    steps.push('cookie HttpOnly');

    const row = page.locator(`tr[data-state-id="${stateId}"]`);
    check((await row.count()) === 1, `no row for state ${stateId}`);
    const rowText = await row.innerText();
    check(rowText.includes(stateId.slice(0, 12)), `the row does not show ${stateId.slice(0, 12)}: ${rowText}`);
    const shown = (await row.locator('.presence').innerText()).trim();
    check(shown === presence, `state ${stateId.slice(0, 12)} shows presence "${shown}", expected "${presence}"`);
    steps.push('state row');

    const html = await page.content();
    check(!html.includes(token), 'the page holds the token');

    const chart = page.locator('svg#usage-chart');
    check((await chart.count()) === 1, 'no usage chart');
    const samples = Number(await chart.getAttribute('data-samples'));
    const lines = await chart.locator('polyline').count();
    check(samples === 0 || lines === 2, `the chart has ${samples} samples and ${lines} lines`);
    steps.push('chart');

    const refresh = await page.locator('meta[http-equiv="refresh"]').getAttribute('content');
    check(refresh === '10', `the page refreshes every ${refresh} s`);

    fs.mkdirSync(path.dirname(screenshot), { recursive: true });
    await page.screenshot({ path: screenshot, fullPage: true });
    const bytes = fs.statSync(screenshot).size;
    check(bytes > 0, `the screenshot ${screenshot} is empty`);
    steps.push('screenshot');

    process.stdout.write(JSON.stringify({
      ok: true,
      url,
      state_id: stateId,
      presence: shown,
      cookie: { http_only: session.httpOnly, same_site: session.sameSite, secure: session.secure },
      chart: { samples, lines },
      screenshot,
      screenshot_bytes: bytes,
      steps,
    }) + '\n');
  } catch (e) {
    failure = `${e.message} (passed: ${steps.join(', ') || 'nothing'})`;
  } finally {
    await browser.close();
  }
  if (failure) fail(failure);
}

main().catch((e) => fail(e.stack || String(e)));
