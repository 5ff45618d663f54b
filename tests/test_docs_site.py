"""The docs site: build it with `bash scripts/docs.sh` (stored notebook outputs), serve `_site/` on
127.0.0.1 and open the home page, one API page and one tutorial in headless Debian `chromium`
(driven by Playwright's Python client with `executable_path`, never a browser Playwright downloads).

Checks on each page: the title is there, every sidebar link answers 200, every <img> loaded, no
request to the local server failed or answered 404, and nothing outside 127.0.0.1 was requested.
Screenshots go to `$RTL_SCREENSHOTS` (default `tests/_screenshots/`, git-ignored).
"""
import functools, http.server, os, shutil, subprocess, threading, urllib.error, urllib.parse, urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT/'_site'
SHOTS = Path(os.environ.get('RTL_SCREENSHOTS', ROOT/'tests'/'_screenshots'))
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']


def _chromium():
    "Path of Debian's chromium, installed with apt-get when missing; None if it cannot be installed"
    for p in ('/usr/bin/chromium', shutil.which('chromium') or ''):
        if p and os.access(p, os.X_OK): return p
    if not shutil.which('apt-get'): return None
    sudo = [] if os.geteuid() == 0 else (['sudo', '-n'] if shutil.which('sudo') else None)
    if sudo is None: return None
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    run = lambda *a: subprocess.run(sudo + ['apt-get', *a], env=env, capture_output=True, timeout=600).returncode
    if run('install', '-y', '-q', 'chromium') != 0:  # the package lists may be missing or stale
        run('update', '-q'); run('install', '-y', '-q', 'chromium')
    return '/usr/bin/chromium' if os.access('/usr/bin/chromium', os.X_OK) else None


_build = {}


@pytest.fixture(scope='module')
def site():
    if 'error' not in _build:  # build once: a failed build is reported by every test, not re-run
        r = subprocess.run(['bash', str(ROOT/'scripts'/'docs.sh')], cwd=ROOT, capture_output=True, text=True, timeout=900)
        _build['error'] = None if r.returncode == 0 else f'scripts/docs.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}'
    if _build['error']: pytest.fail(_build['error'], pytrace=False)
    assert (SITE/'index.html').exists()
    return SITE


@pytest.fixture(scope='module')
def nav(site):
    "The nav that scripts/docs_build.py generated from the notebooks present"
    return yaml.safe_load((ROOT/'_proc'/'mkdocs.yml').read_text())['nav']


class _Handler(http.server.SimpleHTTPRequestHandler):
    log = None
    def log_request(self, code='-', size='-'):
        self.log.append((self.path, int(code) if str(code).isdigit() else code))
    def log_message(self, *args): pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        import sys
        if not isinstance(sys.exc_info()[1], ConnectionError): super().handle_error(request, client_address)


@pytest.fixture(scope='module')
def server(site):
    log = []
    handler = functools.partial(type('H', (_Handler,), {'log': log}), directory=str(site))
    httpd = _Server(('127.0.0.1', 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True); t.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/', log
    httpd.shutdown(); httpd.server_close()


@pytest.fixture(scope='module')
def browser():
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright (Python client) is not installed: pip install playwright')
    exe = _chromium()
    if exe is None: pytest.skip("Debian's chromium is missing and `apt-get install -y chromium` failed: cannot drive a browser here")
    with sync_api.sync_playwright() as p:
        # Playwright gives every launch a fresh temporary profile (its own --user-data-dir)
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _status(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r: return r.status
    except urllib.error.HTTPError as e: return e.code


def _open(browser, server, path, name):
    "Open `path`, run the checks common to every page, save a screenshot; return the page"
    base, log = server
    local = urllib.parse.urlsplit(base).netloc
    outside, bad, failed = [], [], []
    ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
    page = ctx.new_page()
    def _route(route):
        if urllib.parse.urlsplit(route.request.url).netloc == local or route.request.url.startswith('data:'): route.continue_()
        else: outside.append(route.request.url); route.abort()
    page.route('**/*', _route)
    page.on('response', lambda r: bad.append((r.url, r.status)) if r.status >= 400 else None)
    page.on('requestfailed', lambda r: failed.append(r.url) if urllib.parse.urlsplit(r.url).netloc == local else None)
    n0 = len(log)
    resp = page.goto(base + path, wait_until='load')
    assert resp.status == 200, f'{path}: HTTP {resp.status}'
    page.wait_for_load_state('networkidle')
    # title: in <title> and as the page's <h1>
    h1 = page.locator('article h1').first.inner_text().replace('¶', '').strip()
    assert h1 and h1 in page.title(), (h1, page.title())
    # every link of the sidebar resolves
    hrefs = page.eval_on_selector_all('nav.md-nav--primary a.md-nav__link[href]', 'els => els.map(e => e.href)')
    assert len(hrefs) >= 2, f'{path}: no sidebar links'
    for h in sorted(set(u.split('#')[0] for u in hrefs)):
        if urllib.parse.urlsplit(h).netloc == local: assert _status(h) == 200, f'{path}: sidebar link {h} does not resolve'
    # every image loaded
    imgs = page.eval_on_selector_all('img', 'els => els.map(e => [e.currentSrc || e.src, e.complete && e.naturalWidth > 0])')
    assert all(ok for _, ok in imgs), f'{path}: images not loaded: {[s for s, ok in imgs if not ok]}'
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS/f'{name}.png'), full_page=True)
    served_404 = [(p, c) for p, c in log[n0:] if c == 404]
    assert not served_404, f'{path}: local requests answered 404: {served_404}'
    assert not bad, f'{path}: responses >= 400: {bad}'
    assert not failed, f'{path}: local requests failed: {failed}'
    assert not outside, f'{path}: the page requested outside hosts: {outside}'
    return page, ctx, imgs


def test_home(browser, server, nav):
    page, ctx, _ = _open(browser, server, 'index.html', 'home')
    try:
        sections = [list(e)[0] for e in nav]
        assert sections[:2] == ['Home', 'API reference'], sections
        side = page.locator('nav.md-nav--primary').inner_text()
        for s in sections[1:]: assert s in side, (s, side)
        # offline search: the lunr index is served with the site
        page.locator('input.md-search__input').click()
        page.keyboard.type('pgd', delay=30)  # Material searches on key events, not on .fill()
        page.wait_for_selector('.md-search-result__item', timeout=15000)
        assert 'pgd' in page.locator('.md-search-result').inner_text().lower()
        page.screenshot(path=str(SHOTS/'home_search.png'))
    finally: ctx.close()


def test_api_page(browser, server, nav):
    api = dict(e for x in nav if 'API reference' in x for d in x['API reference'] for e in d.items())
    assert 'attacks.md' in api.values(), api
    page, ctx, _ = _open(browser, server, 'attacks.html', 'api_attacks')
    try:
        # show_doc output: the heading, the signature with its docments, the docstring
        assert page.locator('h3#pgd_attack').is_visible()
        code = page.locator('article pre', has_text='def pgd_attack(').first
        assert code.is_visible()
        assert 'or its radius `eps` in [0,1] pixel units' in code.inner_text()  # a docments comment
        assert page.locator('article', has_text='Projected gradient descent').first.is_visible()
        assert page.locator('article a', has_text='source').count() >= 1
    finally: ctx.close()


def test_tutorial_page(browser, server, nav):
    tuts = [p for x in nav if 'Tutorials' in x for d in x['Tutorials'] for p in d.values()]
    if not tuts: pytest.skip('no notebook in nbs/tutorials/ yet: nothing to check for a tutorial page')
    path = tuts[0][:-3] + '.html'
    page, ctx, imgs = _open(browser, server, path, 'tutorial_' + Path(path).stem)
    try:
        assert page.locator('article pre').count() >= 1, f'{path}: no code cell rendered'
    finally: ctx.close()


def test_internal_links_resolve(site):
    "Every relative link of every page opens a page of the site, and its #anchor is an id of that page (the 404 page's "
    "links are absolute: it is served at any depth)"
    from html.parser import HTMLParser
    class Page(HTMLParser):
        def __init__(self): super().__init__(); self.ids, self.hrefs = set(), []
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if a.get('id'): self.ids.add(a['id'])
            if tag == 'a' and a.get('href'): self.hrefs.append(a['href'])
    pages = {}
    for f in site.rglob('*.html'):
        pages[f.resolve()] = p = Page()
        p.feed(f.read_text(encoding='utf-8'))
    bad = set()
    for f, p in pages.items():
        for h in p.hrefs:
            u = urllib.parse.urlsplit(h)
            if u.scheme or u.netloc or h.startswith('/'): continue
            t = (f.parent/urllib.parse.unquote(u.path)).resolve() if u.path else f
            if t.is_dir(): t = t/'index.html'
            rel = f.relative_to(site.resolve())
            if not t.exists(): bad.add(f'{rel}: {h} (no such page)')
            elif u.fragment and t in pages and u.fragment not in pages[t].ids: bad.add(f'{rel}: {h} (no such anchor)')
    assert not bad, '\n'.join(sorted(bad))
