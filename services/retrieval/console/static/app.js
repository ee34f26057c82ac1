// ChatReID investigator console: plain ES2020, no framework, no build step, nothing fetched
// from anywhere but this server. Server text only ever goes in through textContent.
'use strict';

const KEY_STORE = 'chatreid.console.key';
const SESSION_STORE = 'chatreid.console.session';
// The API lives under the same route prefix as /console/ (Serve's route_prefix).
const API = location.pathname.replace(/\/console(\/.*)?$/, '');
const CARD_KEYS = { c: 'confirm', r: 'reject', w: 'explain' };
const LANE_PX = 96; // the height of one row of timeline markers

const state = {
  key: sessionStorage.getItem(KEY_STORE),
  me: null,
  session: null, // SessionView
  cameras: null, // [CameraInfo], loaded once per key
  query: null, // { crop_id, label } or { image_b64, label, preview }
  blobs: new Map(), // crop id -> Promise<object URL>: crops need the auth header, not <img src>
  busy: [],
  explained: null, // crop id whose explanation is open: its card gets focus back
};

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') node.textContent = value;
    else if (name === 'class') node.className = value;
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined)); // strings: text nodes
  return node;
}

// -- formatting -------------------------------------------------------------------------------
const when = (iso) => new Date(iso).toLocaleString(undefined,
  { dateStyle: 'medium', timeStyle: 'medium' });
const clock = (iso) => new Date(iso).toLocaleTimeString(undefined, { timeStyle: 'medium' });
const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
// crop ids are 32 hex digits: the transcript shows a prefix, the full id is in the tooltip
const shortId = (id) => (id.length > 12 ? `${id.slice(0, 8)}…` : id);

function score(r) {
  if (r.reranked && r.confidence !== null) return `confidence ${r.confidence.toFixed(2)}`;
  if (r.prefilter_score !== null && r.prefilter_score !== undefined) {
    return `prefilter ${r.prefilter_score.toFixed(2)}`;
  }
  return 'not scored';
}

function imageLabel(image) {
  if (!image) return null;
  return image.startsWith('upload:') ? 'an uploaded image' : `crop ${shortId(image)}`;
}

// -- the API ----------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, detail, retryAfter = null) {
    super(detail);
    Object.assign(this, { status, code, detail, retryAfter });
  }
}

async function apiError(res) {
  let code = `http.${res.status}`;
  let detail = res.statusText || 'the request failed';
  try {
    const body = await res.json();
    code = body.error || code;
    if (body.detail) detail = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
  } catch { /* not JSON: keep the status text */ }
  return new ApiError(res.status, code, detail, res.headers.get('Retry-After'));
}

async function request(path, init = {}) {
  const auth = state.key ? { Authorization: `Bearer ${state.key}` } : {};
  const headers = { ...auth, ...(init.headers || {}) };
  let res;
  try {
    res = await fetch(API + path, { cache: 'no-store', ...init, headers });
  } catch (err) {
    throw new ApiError(0, 'network', `the server did not answer (${err.message})`);
  }
  if (!res.ok) throw await apiError(res);
  return res;
}

async function api(method, path, body) {
  // The API takes state changes only as JSON, also those without a body (its CSRF guard).
  const init = { method };
  if (body !== undefined || method !== 'GET') init.headers = { 'Content-Type': 'application/json' };
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await request(path, init);
  return res.status === 204 ? null : res.json();
}

const sessionPath = (suffix = '') =>
  `/v1/sessions/${encodeURIComponent(state.session.session_id)}${suffix}`;

// -- crop images ------------------------------------------------------------------------------
function cropUrl(cropId) {
  if (!state.blobs.has(cropId)) {
    const url = request(`/v1/crops/${encodeURIComponent(cropId)}`)
      .then((res) => res.blob())
      .then((blob) => URL.createObjectURL(blob));
    url.catch(() => state.blobs.delete(cropId)); // a failed fetch is retried on the next render
    state.blobs.set(cropId, url);
  }
  return state.blobs.get(cropId);
}

function cropImg(cropId, alt, img = el('img')) {
  img.alt = alt;
  img.decoding = 'async';
  img.classList.add('crop');
  cropUrl(cropId).then((url) => { img.src = url; }, () => {
    img.classList.add('missing');
    img.alt = `${alt} (image unavailable)`;
  });
  return img;
}

function resetBlobs() {
  for (const url of state.blobs.values()) url.then((u) => URL.revokeObjectURL(u), () => {});
  state.blobs.clear();
}

// -- feedback to the investigator -------------------------------------------------------------
function showError(text) {
  $('error-text').textContent = text;
  $('error').hidden = false;
}

function clearError() {
  $('error').hidden = true;
}

function fail(err) {
  if (!(err instanceof ApiError)) {
    console.error(err); // a bug in this page: keep the stack for the developer
    showError(`Unexpected error: ${err.message}`);
    return;
  }
  let text = err.status ? `${err.detail} (HTTP ${err.status}, ${err.code})` : err.detail;
  if (err.status === 429 && err.retryAfter) text += ` Try again in ${err.retryAfter} s.`;
  if (err.status === 401) {
    signOut();
    text = `Sign-in failed: ${text}`;
  } else if (err.status === 410) {
    showSessions(); // the session expired: pick or start another
  }
  showError(text);
}

async function withBusy(label, fn, { search = false } = {}) {
  const job = { label, search, started: performance.now() };
  state.busy.push(job);
  renderBusy();
  const tick = setInterval(renderBusy, 1000);
  try {
    return await fn();
  } catch (err) {
    fail(err);
    return undefined;
  } finally {
    clearInterval(tick);
    state.busy.splice(state.busy.indexOf(job), 1);
    renderBusy();
  }
}

function renderBusy() {
  const job = state.busy[state.busy.length - 1];
  $('busy').hidden = !job;
  document.body.classList.toggle('is-busy', Boolean(job));
  $('search-submit').disabled = state.busy.some((j) => j.search);
  $('results').setAttribute('aria-busy', String(state.busy.some((j) => j.search)));
  if (job) {
    const secs = Math.round((performance.now() - job.started) / 1000);
    $('busy-text').textContent = secs >= 1 ? `${job.label} ${secs} s` : job.label;
  }
}

// -- screens ----------------------------------------------------------------------------------
function show(screen) {
  for (const name of ['key-panel', 'sessions-panel', 'workspace']) $(name).hidden = name !== screen;
}

function showKey() {
  show('key-panel');
  $('whoami').hidden = true;
  $('key-input').focus();
}

async function signIn(key) {
  state.key = key;
  const me = await withBusy('Checking the key…', () => api('GET', '/v1/me'));
  if (!me) return;
  state.me = me;
  sessionStorage.setItem(KEY_STORE, key);
  clearError();
  $('whoami-name').textContent = me.name;
  $('whoami-roles').textContent = me.roles.join(', ') + (key ? '' : ' (access control off)');
  $('whoami').hidden = false;
  const resume = sessionStorage.getItem(SESSION_STORE);
  if (resume) openSession(resume);
  else showSessions();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  sessionStorage.removeItem(SESSION_STORE);
  resetBlobs();
  setQuery(null);
  Object.assign(state, { key: null, me: null, session: null, cameras: null });
  $('camera-select').replaceChildren(el('option', { value: '', text: '— camera —' }));
  $('crop-strip').replaceChildren();
  $('crop-strip').hidden = true;
  showKey();
}

async function showSessions() {
  state.session = null;
  sessionStorage.removeItem(SESSION_STORE);
  show('sessions-panel');
  $('session-title').focus();
  const list = await withBusy('Loading sessions…', () => api('GET', '/v1/sessions'));
  if (!list) return;
  list.sort((a, b) => Date.parse(b.updated_at) - Date.parse(a.updated_at));
  $('session-list').replaceChildren(...list.map(sessionItem));
  $('session-list-empty').hidden = list.length > 0;
}

function sessionItem(s) {
  const title = s.title || 'Untitled session';
  return el('li', { 'data-testid': 'session-item', 'data-session-id': s.session_id },
    el('button', { type: 'button', 'data-testid': 'session-open', class: 'link',
      onclick: () => openSession(s.session_id) }, title),
    el('span', { class: 'hint', text: ` ${plural(s.turns, 'turn')} · ${s.confirmed} confirmed · `
      + `updated ${when(s.updated_at)} · expires ${when(s.expires_at)}` }),
    el('button', { type: 'button', 'data-testid': 'session-delete', class: 'quiet',
      'aria-label': `Delete ${title}`, onclick: () => deleteSession(s.session_id, title) },
    'Delete'));
}

async function deleteSession(id, title) {
  if (!window.confirm(`Delete the session “${title}”? Its transcript is lost.`)) return;
  await withBusy('Deleting…', () => api('DELETE', `/v1/sessions/${encodeURIComponent(id)}`));
  showSessions();
}

async function newSession(ev) {
  ev.preventDefault();
  const title = $('session-title').value.trim();
  const view = await withBusy('Starting a session…',
    () => api('POST', '/v1/sessions', title ? { title } : {}));
  if (!view) return;
  $('session-title').value = '';
  enterSession(view);
}

async function openSession(id) {
  const view = await withBusy('Opening the session…',
    () => api('GET', `/v1/sessions/${encodeURIComponent(id)}`));
  if (view) enterSession(view);
  else if (state.key !== null && $('sessions-panel').hidden) showSessions(); // e.g. it was deleted
}

function enterSession(view) {
  clearError();
  setQuery(null);
  show('workspace');
  setSession(view);
  loadCameras();
  $('search-text').focus();
}

// -- the session ------------------------------------------------------------------------------
function setSession(view) {
  state.session = view;
  sessionStorage.setItem(SESSION_STORE, view.session_id);
  $('session-heading').textContent = view.title || 'Untitled session';
  $('session-meta').textContent = `${view.owner} · started ${when(view.created_at)} · `
    + `expires ${when(view.expires_at)}`;
  renderAnchors(view);
  renderResults(view);
  renderTranscript(view);
  renderTimeline(view.confirmed);
  renderByCamera(view.confirmed);
}

async function refreshSession() {
  setSession(await api('GET', sessionPath()));
}

function renderAnchors(view) {
  const parts = [];
  if (view.anchors.length) parts.push(plural(view.anchors.length, 'image'));
  if (view.clues.length) parts.push(`clues: ${view.clues.map((c) => `“${c}”`).join(', ')}`);
  if (view.changed_clothes) parts.push('clothes may have changed');
  $('anchors').textContent = parts.length ? `The next search also uses ${parts.join('; ')}.` : '';
  $('anchors').hidden = !parts.length;
}

// -- cameras and the query image --------------------------------------------------------------
async function loadCameras() {
  if (state.cameras) return;
  const cameras = await withBusy('Loading cameras…', () => api('GET', '/v1/cameras'));
  if (!cameras) return;
  state.cameras = cameras;
  $('camera-select').replaceChildren(el('option', { value: '', text: '— camera —' }),
    ...cameras.map((c) => el('option', { value: c.camera,
      text: `${c.camera} · ${plural(c.crops, 'crop')} · last ${when(c.last_seen)}` })));
}

async function pickCamera() {
  const camera = $('camera-select').value;
  const strip = $('crop-strip');
  strip.replaceChildren();
  strip.hidden = !camera;
  if (!camera) return;
  const crops = await withBusy(`Loading ${camera}…`,
    () => api('GET', `/v1/cameras/${encodeURIComponent(camera)}/crops?limit=24`));
  if (!crops || $('camera-select').value !== camera) return; // the investigator moved on
  strip.replaceChildren(...crops.map(thumb));
  if (!crops.length) strip.append(el('p', { class: 'hint', text: 'No crops from this camera.' }));
}

function thumb(c) {
  const label = `${c.camera}, ${when(c.capture_time)}`;
  const selected = state.query && state.query.crop_id === c.crop_id;
  return el('button', { type: 'button', class: 'thumb', 'data-testid': 'crop-pick',
    'data-crop-id': c.crop_id, 'aria-pressed': String(Boolean(selected)),
    title: `Search from this crop (${label})`,
    onclick: () => setQuery({ crop_id: c.crop_id, label: `crop from ${label}` }) },
  cropImg(c.crop_id, `Crop from ${label}`), el('span', { text: clock(c.capture_time) }));
}

function readUpload() {
  const file = $('upload').files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    // the API takes bare base64: drop the "data:image/...;base64," prefix
    const b64 = String(reader.result).split(',', 2)[1] || '';
    setQuery({ image_b64: b64, label: `upload ${file.name}`, preview: URL.createObjectURL(file) },
      true);
  };
  reader.onerror = () => showError(`Could not read ${file.name}: ${reader.error}`);
  reader.readAsDataURL(file);
}

function setQuery(query, fromUpload = false) {
  if (state.query && state.query.preview) URL.revokeObjectURL(state.query.preview);
  state.query = query;
  if (!fromUpload) $('upload').value = '';
  for (const b of document.querySelectorAll('[data-testid="crop-pick"]')) {
    b.setAttribute('aria-pressed', String(Boolean(query && b.dataset.cropId === query.crop_id)));
  }
  $('query-image').hidden = !query;
  const img = $('query-image-img');
  img.removeAttribute('src');
  if (!query) return;
  $('query-image-label').textContent = `Search from ${query.label}`;
  if (query.preview) {
    img.src = query.preview;
    img.alt = query.label;
  } else {
    cropImg(query.crop_id, query.label, img);
  }
}

// -- searching and feedback -------------------------------------------------------------------
async function search(ev) {
  ev.preventDefault();
  if (!state.session) return;
  const text = $('search-text').value.trim();
  const body = { changed_clothes: $('changed-clothes').checked };
  if (text) body.text = text;
  if (state.query && state.query.crop_id) body.crop_id = state.query.crop_id;
  if (state.query && state.query.image_b64) body.image_b64 = state.query.image_b64;
  const { anchors, clues } = state.session;
  if (!text && !state.query && !anchors.length && !clues.length) {
    showError('Describe the person, upload an image or pick a crop first.');
    $('search-text').focus();
    return;
  }
  clearError();
  const ok = await withBusy('Searching (the VLM may take 30 s)…', async () => {
    await api('POST', sessionPath('/search'), body);
    await refreshSession(); // the session derives the next query's images and clues
    return true;
  }, { search: true });
  if (!ok) return;
  // the session keeps what was asked: the next search refines it
  $('search-text').value = '';
  $('changed-clothes').checked = false;
  setQuery(null);
  const first = $('results').querySelector('.card');
  if (first) first.focus();
}

async function feedback(cropId, verdict) {
  clearError();
  const view = await withBusy(verdict === 'confirm' ? 'Confirming…' : 'Rejecting…',
    () => api('POST', sessionPath('/feedback'), { crop_id: cropId, verdict }));
  if (view) setSession(view);
}

async function explain(cropId) {
  clearError();
  const ok = await withBusy('Asking the model why…', async () => {
    const why = await api('POST', sessionPath('/explain'), { crop_id: cropId });
    await refreshSession(); // the question joins the transcript
    showExplanation(why);
    return true;
  });
  if (!ok) focusCard(cropId);
}

function act(action, cropId) {
  if (action === 'explain') explain(cropId);
  else feedback(cropId, action);
}

// -- rendering --------------------------------------------------------------------------------
function lastSearch(view) {
  for (let i = view.turns.length - 1; i >= 0; i -= 1) {
    if (view.turns[i].action === 'search') return view.turns[i];
  }
  return null;
}

function renderResults(view) {
  const turn = lastSearch(view);
  const decided = new Set([...view.rejected, ...view.confirmed.map((s) => s.crop_id)]);
  const items = turn ? turn.results.filter((r) => !decided.has(r.crop_id)) : [];
  const grid = $('results');
  // keep the keyboard where it was: the card now at the focused card's place gets focus
  const focused = document.activeElement && document.activeElement.closest('.card');
  const at = focused ? [...grid.children].indexOf(focused) : -1;
  grid.replaceChildren(...items.map(card));
  if (at >= 0 && grid.children.length) grid.children[Math.min(at, grid.children.length - 1)].focus();
  $('results-empty').hidden = items.length > 0;
  $('results-empty').textContent = turn ? 'Every result of the last search is decided: '
    + 'search again to see more.' : 'No results yet: start a search.';
  $('results-meta').textContent = turn ? `${turn.query_kind || 'search'} · ${items.length} of `
    + `${turn.results.length} undecided · ${plural(turn.vlm_calls, 'VLM call')}` : '';
}

function card(r) {
  const label = `Rank ${r.rank}: ${r.camera}, ${when(r.capture_time)}, ${score(r)}`;
  return el('article', { class: `card${r.reranked ? ' reranked' : ''}`, tabindex: 0,
    'data-testid': 'result-card', 'data-crop-id': r.crop_id, 'data-rank': r.rank,
    'aria-label': label },
  el('div', { class: 'card-img' }, cropImg(r.crop_id, `Result ${r.rank}`),
    el('span', { class: 'rank', 'data-testid': 'result-rank', text: `#${r.rank}` })),
  el('div', { class: 'card-meta' },
    el('strong', { 'data-testid': 'result-camera', text: r.camera }),
    el('span', { class: 'modality', text: r.modality }),
    el('time', { datetime: r.capture_time, text: when(r.capture_time) }),
    el('span', { 'data-testid': 'result-score', class: 'score', text: score(r) })),
  el('div', { class: 'actions' },
    el('button', { type: 'button', class: 'ok', 'data-testid': 'confirm', title: 'Confirm (c)',
      onclick: () => feedback(r.crop_id, 'confirm') }, 'Confirm'),
    el('button', { type: 'button', class: 'no', 'data-testid': 'reject', title: 'Reject (r)',
      onclick: () => feedback(r.crop_id, 'reject') }, 'Reject'),
    el('button', { type: 'button', 'data-testid': 'why', title: 'Why this result? (w)',
      onclick: () => explain(r.crop_id) }, 'Why?')));
}

function focusCard(cropId) {
  const target = [...$('results').children].find((c) => c.dataset.cropId === cropId);
  if (target) target.focus();
}

function renderTranscript(view) {
  const list = $('transcript');
  list.replaceChildren(...view.turns.map(turnItem));
  if (!view.turns.length) list.append(el('li', { class: 'hint', text: 'Nothing asked yet.' }));
  list.scrollTop = list.scrollHeight;
}

function turnItem(t) {
  const head = el('div', { class: 'turn-head' },
    el('strong', { text: { search: 'Search', confirm: 'Confirmed', reject: 'Rejected',
      explain: 'Asked why' }[t.action] || t.action }),
    el('time', { datetime: t.at, text: clock(t.at) }));
  const lines = [];
  if (t.action === 'search') {
    const asked = [t.text && `“${t.text}”`, t.attributes.length && t.attributes.join(', '),
      imageLabel(t.image), t.changed_clothes && 'may have changed clothes'].filter(Boolean);
    lines.push(asked.length ? asked.join(' · ') : 'the session\'s images and clues');
    lines.push(`${t.query_kind || '?'} · ${plural(t.results.length, 'result')} · `
      + `${plural(t.vlm_calls, 'VLM call')}`);
  } else {
    const s = t.sighting;
    const crop = `crop ${shortId(t.crop_id || '?')}`;
    lines.push(s ? `${crop} · ${s.camera} · ${when(s.capture_time)}` : crop);
  }
  if (t.note) lines.push(`note: ${t.note}`);
  return el('li', { class: `turn ${t.action}`, 'data-testid': 'turn', 'data-action': t.action,
    'data-crop-id': t.crop_id, 'data-image': t.image, title: t.crop_id || t.image },
  head, ...lines.map((line) => el('div', { text: line })));
}

function laneOf(lanes, pos, gap) {
  // the first lane whose last marker is far enough to the left; else the emptiest-looking one
  let lane = lanes.findIndex((last) => pos - last >= gap);
  if (lane < 0) lane = lanes.length < 3 ? lanes.length : lanes.indexOf(Math.min(...lanes));
  lanes[lane] = pos;
  return lane;
}

function renderTimeline(sightings) {
  $('timeline').hidden = !sightings.length;
  $('timeline-empty').hidden = sightings.length > 0;
  const track = $('timeline-track');
  if (!sightings.length) {
    track.replaceChildren();
    return;
  }
  const times = sightings.map((s) => Date.parse(s.capture_time));
  const first = Math.min(...times);
  const span = Math.max(...times) - first;
  const lanes = [];
  track.replaceChildren(...sightings.map((s, i) => {
    const pos = span ? 3 + (94 * (times[i] - first)) / span : 50; // percent of the axis
    const lane = laneOf(lanes, pos, 9);
    const mark = el('figure', { class: 'mark', 'data-testid': 'timeline-item',
      'data-crop-id': s.crop_id, 'data-camera': s.camera, title: `${s.camera}, ${when(s.capture_time)}` },
    cropImg(s.crop_id, `Sighting on ${s.camera} at ${when(s.capture_time)}`),
    el('figcaption', {}, el('strong', { text: s.camera }), el('br'), clock(s.capture_time)));
    mark.style.left = `${pos}%`;
    mark.style.top = `${lane * LANE_PX}px`;
    return mark;
  }));
  track.style.height = `${Math.max(1, lanes.length) * LANE_PX}px`;
  $('timeline-start').textContent = when(new Date(first).toISOString());
  $('timeline-end').textContent = span ? when(new Date(first + span).toISOString()) : '';
}

function renderByCamera(sightings) {
  const groups = new Map();
  for (const s of sightings) {
    if (!groups.has(s.camera)) groups.set(s.camera, []);
    groups.get(s.camera).push(s);
  }
  const box = $('by-camera');
  box.replaceChildren(...[...groups].map(([camera, list]) => el('section', {
    class: 'camera-group', 'data-testid': 'camera-group', 'data-camera': camera },
  el('h4', { text: `${camera} · ${plural(list.length, 'sighting')}` }),
  el('div', { class: 'camera-row' }, ...list.map((s) => el('figure', {
    'data-testid': 'camera-sighting', 'data-crop-id': s.crop_id },
  cropImg(s.crop_id, `Sighting on ${camera} at ${when(s.capture_time)}`),
  el('figcaption', { text: clock(s.capture_time), title: when(s.capture_time) })))))));
  if (!groups.size) box.append(el('p', { class: 'hint', text: 'No confirmed sightings yet.' }));
}

function showExplanation(why) {
  const agrees = (a) => (a === null ? ['?', 'unknown'] : a ? ['✓', 'agrees'] : ['✗', 'differs']);
  state.explained = why.crop_id;
  $('explanation-crop').textContent = why.crop_id;
  $('explanation-reference').textContent = why.reference === 'upload' ? 'the uploaded image'
    : why.reference === 'text' ? 'the text clues' : `crop ${why.reference}`;
  $('explanation-model').textContent = why.model_version || 'unknown';
  $('explanation-rationale').textContent = why.rationale || 'The model gave no rationale.';
  cropImg(why.crop_id, `Crop ${why.crop_id}`, $('explanation-img'));
  $('explanation-table').tBodies[0].replaceChildren(...why.comparison.map((c) => {
    const [mark, word] = agrees(c.agrees);
    return el('tr', { class: word, 'data-testid': 'comparison-row' },
      el('th', { scope: 'row', text: c.attribute }), el('td', { text: c.reference ?? '—' }),
      el('td', { text: c.candidate ?? '—' }), el('td', { text: `${mark} ${word}` }));
  }));
  if (!why.comparison.length) {
    $('explanation-table').tBodies[0].append(el('tr', {}, el('td', { colspan: 4,
      class: 'hint', text: 'No attributes to compare.' })));
  }
  $('explanation').showModal();
  $('explanation-close').focus();
}

// -- wiring -----------------------------------------------------------------------------------
function onKey(ev) {
  if (ev.defaultPrevented || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const typing = ev.target.closest && ev.target.closest('input, textarea, select');
  if (typing || $('explanation').open || $('workspace').hidden) return;
  if (ev.key === '/') {
    ev.preventDefault();
    $('search-text').focus();
    return;
  }
  const current = ev.target.closest && ev.target.closest('.card');
  if (!current) return;
  const action = CARD_KEYS[ev.key.toLowerCase()];
  if (action) {
    ev.preventDefault();
    act(action, current.dataset.cropId);
  } else if (ev.key === 'ArrowRight' || ev.key === 'ArrowLeft') {
    const next = ev.key === 'ArrowRight' ? current.nextElementSibling : current.previousElementSibling;
    if (next) {
      ev.preventDefault();
      next.focus();
    }
  }
}

function wire() {
  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('key-input').value.trim();
    $('key-input').value = ''; // the key lives in sessionStorage only, not in the DOM
    if (key) signIn(key);
  });
  $('sign-out').addEventListener('click', () => { clearError(); signOut(); });
  $('error-dismiss').addEventListener('click', clearError);
  $('new-session-form').addEventListener('submit', newSession);
  $('back-to-sessions').addEventListener('click', () => { clearError(); showSessions(); });
  $('search-form').addEventListener('submit', search);
  $('camera-select').addEventListener('change', pickCamera);
  $('upload').addEventListener('change', readUpload);
  $('query-image-clear').addEventListener('click', () => setQuery(null));
  $('explanation-close').addEventListener('click', () => $('explanation').close());
  $('explanation').addEventListener('close', () => focusCard(state.explained));
  document.addEventListener('keydown', onKey);
  window.addEventListener('unhandledrejection', (ev) => fail(ev.reason));
}

async function start() {
  wire();
  if (state.key !== null) {
    signIn(state.key);
    return;
  }
  // Access control turned off on the server (access.insecure): there is no key to ask for.
  const health = await fetch(`${API}/healthz`, { cache: 'no-store' })
    .then((res) => (res.ok ? res.json() : null), () => null);
  if (health && health.access_control === false) signIn('');
  else showKey();
}

start();
