'use strict';
// exo's web page: a chat streamed from /v1/chat/completions (SSE) and the cluster
// panel polled from /v1/cluster. Plain JavaScript, no dependencies.

const $ = (id) => document.getElementById(id);
const KEY = 'exo.key';
const SETTINGS = 'exo.settings';
const FIELDS = ['system', 'temperature', 'top_p', 'max_tokens', 'seed'];
const POLL_MS = 2000;

let history = [];   // the conversation: {role, content}
let running = null; // the AbortController of the answer being streamed
let keyWaiters = [];

// ------------------------------------------------------------------ the API key

function headers() {
  const h = {'Content-Type': 'application/json'};
  const key = localStorage.getItem(KEY);
  if (key) h.Authorization = 'Bearer ' + key;
  return h;
}

// fetch() with the key; a 401 asks for the key, then tries again
async function api(path, init = {}) {
  for (;;) {
    const r = await fetch(path, {...init, headers: headers()});
    if (r.status !== 401) return r;
    await askKey();
  }
}

function askKey() {
  return new Promise((resolve) => {
    keyWaiters.push(resolve);
    const d = $('key-dialog');
    if (!d.open) {
      $('key-input').value = '';
      d.showModal();
    }
  });
}

// without the key nothing works: Escape does not dismiss the question
$('key-dialog').addEventListener('cancel', (e) => e.preventDefault());

$('key-form').addEventListener('submit', () => {
  localStorage.setItem(KEY, $('key-input').value.trim());
  keyWaiters.splice(0).forEach((resolve) => resolve());
});

async function errorText(r) {
  try {
    const v = await r.json();
    return v.error ? v.error.message : r.status + ' ' + r.statusText;
  } catch {
    return r.status + ' ' + r.statusText;
  }
}

// ------------------------------------------------------------------ settings

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS) || '{}');
  } catch { /* ignore a damaged entry */ }
  for (const f of FIELDS) if (typeof saved[f] === 'string') $(f).value = saved[f];
}

$('settings').addEventListener('input', () => {
  const s = {};
  for (const f of FIELDS) s[f] = $(f).value;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
});

function requestBody() {
  const num = (id) => ($(id).value === '' ? undefined : Number($(id).value));
  const system = $('system').value.trim();
  const messages = system ? [{role: 'system', content: system}, ...history] : history;
  return {
    messages,
    stream: true,
    stream_options: {include_usage: true},
    temperature: num('temperature'),
    top_p: num('top_p'),
    max_tokens: num('max_tokens'),
    seed: num('seed'),
  };
}

// ------------------------------------------------------------------ the chat

function addMessage(role, text) {
  $('empty').hidden = true;
  const el = document.createElement('div');
  el.className = 'msg ' + role;
  const body = document.createElement('div');
  body.className = 'text';
  body.textContent = text;
  el.append(body);
  $('messages').append(el);
  el.scrollIntoView({block: 'end'});
  return el;
}

function setBusy(busy) {
  $('send').disabled = busy;
  $('stop').disabled = !busy;
  $('regen').disabled = busy || !history.some((m) => m.role === 'assistant');
}

// The data: payloads of the complete events in `buf`, and what is left over.
function sseEvents(buf) {
  const events = [];
  let i;
  while ((i = buf.indexOf('\n\n')) >= 0) {
    const lines = buf.slice(0, i).split('\n').filter((l) => l.startsWith('data:'));
    events.push(lines.map((l) => l.slice(5).trimStart()).join('\n'));
    buf = buf.slice(i + 2);
  }
  return [events, buf];
}

// Streams the answer to `history` into a new assistant message.
async function answer() {
  const el = addMessage('assistant', '');
  const text = el.querySelector('.text');
  const meta = document.createElement('div');
  meta.className = 'meta';
  el.append(meta);
  const conversation = history; // Clear starts another one
  const ctl = new AbortController();
  running = ctl;
  setBusy(true);
  let content = '', chunks = 0, tokens = 0, first = 0;
  const t0 = performance.now();
  el.dataset.state = 'streaming';
  try {
    const body = JSON.stringify(requestBody());
    const r = await api('/v1/chat/completions', {method: 'POST', body, signal: ctl.signal});
    if (!r.ok) throw new Error(await errorText(r));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      let events;
      [events, buf] = sseEvents(buf + decoder.decode(value, {stream: true}));
      for (const data of events) {
        if (data === '[DONE]') continue;
        const v = JSON.parse(data);
        if (v.error) throw new Error(v.error.message);
        if (v.usage) tokens = v.usage.completion_tokens;
        const delta = v.choices && v.choices[0] && v.choices[0].delta.content;
        if (!delta) continue;
        if (!first) first = performance.now();
        content += delta;
        chunks += 1;
        text.textContent = content;
        el.dataset.chunks = chunks;
        el.scrollIntoView({block: 'end'});
      }
    }
    el.dataset.state = 'done';
  } catch (e) {
    el.dataset.state = e.name === 'AbortError' ? 'stopped' : 'error';
    if (e.name !== 'AbortError') {
      const err = document.createElement('div');
      err.className = 'error';
      err.textContent = e.message;
      el.append(err);
    }
  }
  const secs = (performance.now() - t0) / 1000;
  const n = tokens || chunks;
  const rate = first && n > 1 ? (n - 1) / ((performance.now() - first) / 1000) : 0;
  meta.textContent = `${n} tokens · ${rate.toFixed(1)} tok/s · ${secs.toFixed(1)} s` +
    (el.dataset.state === 'stopped' ? ' · stopped' : '');
  conversation.push({role: 'assistant', content});
  running = null;
  setBusy(false);
}

$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const msg = $('input').value.trim();
  if (!msg || running) return;
  $('input').value = '';
  history.push({role: 'user', content: msg});
  addMessage('user', msg);
  answer();
});

$('input').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});

$('stop').addEventListener('click', () => running && running.abort());

$('regen').addEventListener('click', () => {
  if (running || history.length === 0 || history[history.length - 1].role !== 'assistant') return;
  history.pop();
  const msgs = $('messages').querySelectorAll('.msg.assistant');
  msgs[msgs.length - 1].remove();
  answer();
});

$('clear').addEventListener('click', () => {
  if (running) running.abort();
  history = [];
  $('messages').querySelectorAll('.msg').forEach((m) => m.remove());
  $('empty').hidden = false;
  setBusy(false);
});

// ------------------------------------------------------------------ the cluster

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
}

function showCluster(v) {
  const m = v.model || {};
  $('model').textContent = m.id || '?';
  $('ctx').textContent = v.head ? `a worker: chat on the head (${v.head})`
    : m.context_length ? `context ${m.context_length}` : 'loading…';
  const tbody = $('peers').tBodies[0];
  tbody.replaceChildren();
  let peers = v.peers || [];
  if (peers.length === 0 && m.layers) {
    // a single node: itself, every layer
    peers = [{name: 'this node', start: 0, end: m.layers, state: 'up', rtt_ms: 0, tokens_per_s: 0}];
  }
  for (const p of peers) {
    const row = tbody.insertRow();
    cell(row, p.name);
    cell(row, `${p.start}..${p.end}`, 'num');
    cell(row, p.state, p.state === 'up' ? 'up' : 'down');
    cell(row, p.rtt_ms ? p.rtt_ms.toFixed(1) : '–', 'num');
    cell(row, p.tokens_per_s ? p.tokens_per_s.toFixed(1) : '–', 'num');
  }
  const down = peers.some((p) => p.state !== 'up');
  $('status').className = 'dot ' + (down || !m.context_length ? 'warn' : 'ok');
  $('status').title = down ? 'a peer is missing' : m.context_length ? 'serving' : 'loading';
}

async function pollCluster() {
  try {
    const r = await fetch('/v1/cluster');
    if (!r.ok) throw new Error(await errorText(r));
    showCluster(await r.json());
  } catch (e) {
    $('status').className = 'dot down';
    $('status').title = 'no answer: ' + e.message;
  }
  setTimeout(pollCluster, POLL_MS);
}

// ------------------------------------------------------------------ start

loadSettings();
// on a phone the settings start folded, out of the chat's way
const narrow = matchMedia('(max-width: 700px)');
$('settings-panel').open = !narrow.matches;
narrow.addEventListener('change', (e) => { $('settings-panel').open = !e.matches; });
pollCluster();
// asks for the key at once when the API needs one
api('/v1/models').catch(() => {});
setBusy(false);
performance.mark('exo-ready');
