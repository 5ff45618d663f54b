"""Build the docs site offline: nbdev's notebook processing, then MkDocs (Material) renders it.

Run it through `bash scripts/docs.sh` (see DEVELOPING.md, "Docs"). Steps:
1. `--execute` only: copy nbs/ to a temporary folder and execute every notebook there with execnb's
   `CaptureShell`, skipping the cells `nbdev_test` skips (`#| eval: false`, settings.ini `tst_flags`).
2. `nbdev.serve.proc_nbs`: nbdev's own processors (the ones `nbdev_docs` uses before Quarto) write
   `_proc/`: show_doc cells added and executed, exported/hidden cells removed, links added,
   frontmatter made. nbdev's `nbdev_proc_nbs` command is not called because it installs Quarto first.
3. Every processed notebook is exported to Markdown by nbconvert's `MarkdownExporter` (images become
   files) after the Quarto cell options nbdev leaves in the cells (`echo`, `include`, `output`,
   `code-fold`) are mapped to nbconvert's tag removal; links nbdev made to the published site are made
   relative.
4. `_proc/mkdocs.yml` (INHERIT scripts/docs_mkdocs.yml + the nav generated from nbs/) is built by
   MkDocs into `_site/`.
"""
import argparse, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT/'scripts'
IMG_EXTS = {'.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp'}
SECTIONS = {'tutorials': 'Tutorials', 'experiments': 'Experiments'}
_re_dir = re.compile(r'^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')


def _say(*a): print('docs:', *a, flush=True)


def list_notebooks(nbs):
    "Notebooks of `nbs` that nbdev renders (nbdev skips folders starting with `_` or `.`), as relative paths"
    from nbdev.doclinks import nbglob
    files = nbglob(nbs, func=Path, file_re=r'\.ipynb$', skip_folder_re=r'(?:^[_.]|^www$)')
    return sorted(Path(f).relative_to(nbs) for f in files)


# ---------------------------------------------------------------- 1. optional execution
def execute_notebooks(nbs, rels, dest):
    "Copy `nbs` to `dest` and execute `rels` there like `nbdev_test` does (same skipped cells)"
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    shutil.copytree(nbs, dest, dirs_exist_ok=True)
    flags = set(get_config().get('tst_flags', '').split('|')) - {''}
    def _skip(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export' + '(' in cell.source: return True
        d = getattr(cell, 'directives_', {}) or {}
        if d.get('eval:', [''])[0].lower() == 'false': return True
        return bool(flags & d.keys())
    failed = []
    for rel in rels:
        fn = dest/rel
        t0 = time.time()
        nb = read_nb(fn)
        # NBProcessor parses each cell's `#|` directives into `directives_` (the sources are kept)
        NBProcessor(nb=nb, procs=[], rm_directives=False)
        k = CaptureShell(fn)
        os.environ['IN_TEST'] = '1'
        try:
            with working_directory(fn.parent): k.run_all(nb, exc_stop=True, preproc=_skip)
        except Exception:
            sys.stderr.write(k.prettytb(fname=fn) + '\n'); failed.append(str(rel))
        finally: os.environ.pop('IN_TEST', None)
        for c in nb.cells: c.pop('directives_', None); c.pop('idx_', None)
        write_nb(nb, fn)
        _say(f'executed {rel} in {time.time()-t0:.1f}s')
    if failed: raise SystemExit(f'docs: executing failed in {failed}; fix them or build without --execute')


# ---------------------------------------------------------------- 2. nbdev processing
def process(path, n_workers, mode):
    "nbdev's processing into _proc/, forced when the previous build used another `mode`"
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    cache = get_config().config_path/'_proc'
    marker = cache/'.rtl_docs_mode'
    force = not marker.exists() or marker.read_text() != mode
    t0 = time.time()
    try: proc_nbs(str(path), n_workers=n_workers, force=force)
    except Exception as e:
        raise SystemExit(f"docs: nbdev's processing failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "traceback above). To render show_doc, nbdev executes each notebook's export cells, show_doc cells and "
            "every cell that imports something, and nothing else: a cell that mixes an import with code that needs "
            "other cells fails here (as it would in `nbdev_docs`). Put imports in cells of their own.") from None
    marker.write_text(mode)
    _say(f'nbdev processed notebooks into {cache.relative_to(ROOT)}/ in {time.time()-t0:.1f}s')
    return cache


# ---------------------------------------------------------------- 3. notebooks -> Markdown
def _frontmatter(nb):
    "Remove nbdev's frontmatter raw cell from `nb` and return its YAML as a dict"
    for i, c in enumerate(nb.cells):
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            try: fm = yaml.safe_load(c.source.strip().strip('-')) or {}
            except yaml.YAMLError: continue
            del nb.cells[i]
            return fm
    return {}


def _quarto_cells(nb):
    "Map the Quarto cell options nbdev leaves in code cells to nbconvert's removal tags"
    import nbformat
    cells = []
    for c in nb.cells:
        if c.cell_type != 'code':
            cells.append(c); continue
        lines = c.source.splitlines()
        opts, n = {}, 0
        while n < len(lines) and (m := _re_dir.match(lines[n])):
            opts[m.group(1)] = m.group(2).strip('"\''); n += 1
        c.source = '\n'.join(lines[n:]).strip('\n')
        tags = set(c.metadata.get('tags', []))
        false = lambda k: opts.get(k, '').lower() == 'false'
        if false('include'): tags.add('remove_cell')
        if false('echo') or not c.source.strip(): tags.add('remove_input')
        if false('output'): tags.add('remove_output')
        c.metadata['tags'] = sorted(tags)
        fold = opts.get('code-fold', '').lower()
        if fold in ('show', 'true') and 'remove_cell' not in tags and 'remove_input' not in tags:
            # Quarto folds this source ("Exported source"): a collapsible block (pymdownx.details)
            mark = '???+' if fold == 'show' else '???'
            summary = opts.get('code-summary', 'Code').replace('"', "'")
            body = '\n'.join('    ' + l if l.strip() else '' for l in ['```python', *c.source.splitlines(), '```'])
            cells.append(nbformat.v4.new_markdown_cell(f'{mark} quote "{summary}"\n\n{body}'))
            c.metadata['tags'] = sorted(tags | {'remove_input'})
        cells.append(c)
    nb.cells = cells


def _exporter():
    from nbconvert import MarkdownExporter
    from traitlets.config import Config
    cfg = Config()
    cfg.CoalesceStreamsPreprocessor.enabled = True  # merges streams, applies `\r` (progress bars) like Jupyter
    cfg.TagRemovePreprocessor.enabled = True
    cfg.TagRemovePreprocessor.remove_cell_tags = {'remove_cell'}
    cfg.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    cfg.TagRemovePreprocessor.remove_all_outputs_tags = {'remove_output'}
    return MarkdownExporter(config=cfg, template_file=str(SCRIPTS/'docs_markdown.md.j2'))


def to_markdown(proc, rels, md_dir, doc_url):
    "Export the processed notebooks `rels` of `proc` to Markdown pages in `md_dir`; return their nav entries"
    import nbformat
    exp = _exporter()
    pages = []
    for rel in rels:
        src = proc/rel
        if not src.exists(): raise SystemExit(f'docs: nbdev did not process {rel} (see the messages above)')
        nb = nbformat.read(src, as_version=4)
        fm = _frontmatter(nb)
        _quarto_cells(nb)
        # code fences get their language from here (nbdev_clean leaves no language_info)
        from nbdev.process import nb_lang
        nb.metadata.setdefault('language_info', {}).setdefault('name', nb_lang(nb) or 'python')
        out = fm.get('output-file') or rel.name
        out_rel = rel.parent/(Path(out).stem + '.md')
        stem = out_rel.stem
        body, res = exp.from_notebook_node(nb, resources={'unique_key': stem, 'output_files_dir': f'{stem}_files'})
        dst = md_dir/out_rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        for name, data in res.get('outputs', {}).items():
            (dst.parent/name).parent.mkdir(parents=True, exist_ok=True)
            (dst.parent/name).write_bytes(data)
        # nbdev links names to the published site (`doc_host`+`doc_baseurl`): point them at this build
        if doc_url: body = body.replace(doc_url.rstrip('/') + '/', '../'*len(rel.parent.parts) or './')
        title = str(fm.get('title') or stem)
        head = {'title': title}
        if fm.get('description'): head['description'] = str(fm['description'])
        text = '---\n' + yaml.safe_dump(head, allow_unicode=True, sort_keys=False) + '---\n\n'
        text += f'# {title}\n\n'
        if fm.get('description'): text += f'{fm["description"]}\n{{: .rtl-description }}\n\n'
        text += body
        dst.write_text(text, encoding='utf-8')
        pages.append((rel, out_rel, title))
    return pages


_re_link = re.compile(r'(?<!!)\[((?:[^\[\]\n]|\[[^\]\n]*\])*)\]\(([^()\s]+)((?:\s+"[^"\n]*")?)\)')
_re_code = re.compile(r'(`+)(?:(?!\1).)+?\1')  # an inline code span
_re_fence = re.compile(r'^\s*(```|~~~)')


def _slug(text):
    "The id MkDocs' `toc` gives a heading (or an anchor written as nbdev/Quarto would): `Learner.fit` -> `learnerfit`"
    from markdown.extensions.toc import slugify
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text.replace('`', ''))
    return slugify(re.sub(r'\s*\{[^}]*\}\s*$', '', text), '-')


def _anchors(md):
    "The ids of a Markdown page: its headings' (or their `{#id}`) and those written in HTML"
    ids, fence = set(re.findall(r'\bid="([^"]+)"', md)), False
    for line in md.splitlines():
        if _re_fence.match(line): fence = not fence
        elif not fence and (m := re.match(r'#{1,6}\s+(.*?)\s*$', line)):
            a = re.search(r'\{[^}]*#([^\s}]+)[^}]*\}\s*$', m.group(1))
            i = a.group(1) if a else _slug(m.group(1))
            k, base = 0, i
            while i in ids: k += 1; i = f'{base}_{k}'  # a repeated heading: `toc` numbers it
            ids.add(i)
    return ids


def fix_links(md_dir, pages):
    ("Links that work on a Quarto site but not here: to a notebook (`x.ipynb`) become links to its page; anchors get "
     "MkDocs' ids (`#learner.fit` -> `#learnerfit`); an anchor its page lacks (nbdev links private names, which have no "
     "heading) is dropped: the link goes to the page, or, on the same page, keeps its text only. Code is left alone. "
     "Returns the anchors dropped, as `(page, target)`.")
    import posixpath
    page_of = {rel.as_posix(): out_rel.as_posix() for rel, out_rel, _ in pages}
    texts = {out_rel.as_posix(): (md_dir/out_rel).read_text(encoding='utf-8') for _, out_rel, _ in pages}
    ids = {k: _anchors(v) for k, v in texts.items()}
    dropped = []
    for rel, out_rel, _ in pages:
        here, nb_dir = out_rel.as_posix(), rel.parent.as_posix()
        def fix(m):
            text, url, title = m.group(1), m.group(2), m.group(3)
            if re.match(r'^[a-z][\w+.-]*:|^/', url): return m.group(0)  # another site, or absolute
            path, _, frag = url.partition('#')
            target = here
            if path.endswith('.ipynb'):
                nb = posixpath.normpath(posixpath.join(nb_dir, path))
                if nb not in page_of: return m.group(0)
                target = page_of[nb]
                path = posixpath.relpath(target, posixpath.dirname(here) or '.')
            elif path:
                target = posixpath.normpath(posixpath.join(posixpath.dirname(here), re.sub(r'\.html$', '.md', path)))
            if not frag or target not in ids: return f'[{text}]({path}{"#" + frag if frag else ""}{title})'
            if frag not in ids[target]: frag = _slug(frag)
            if frag in ids[target]: return f'[{text}]({path}#{frag}{title})'
            dropped.append((here, url))
            return f'[{text}]({path}{title})' if target != here else text
        def outside_code(line):  # inline code spans are kept as they are (a link's text may hold one)
            spans = []
            def mask(m): spans.append(m.group(0)); return f'\0{len(spans)-1}\0'
            line = _re_link.sub(fix, _re_code.sub(mask, line))
            return re.sub(r'\0(\d+)\0', lambda m: spans[int(m.group(1))], line)
        out, fence = [], False
        for line in texts[here].splitlines(keepends=True):
            if _re_fence.match(line): fence = not fence
            out.append(line if fence else outside_code(line))
        (md_dir/out_rel).write_text(''.join(out), encoding='utf-8')
    return dropped


def copy_assets(nbs, md_dir):
    "Images referenced from markdown cells (e.g. `![](images/x.png)`) keep their paths relative to nbs/"
    for f in nbs.rglob('*'):
        r = f.relative_to(nbs)
        if f.suffix.lower() in IMG_EXTS and not any(p.startswith(('.', '_')) for p in r.parts):
            (md_dir/r).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, md_dir/r)


def make_nav(pages):
    "Home, API reference (top-level notebooks in file order), then one section per subfolder"
    home, api, sub = [], [], {}
    for rel, out_rel, title in pages:
        entry = {title: out_rel.as_posix()}
        if rel.as_posix() == 'index.ipynb': home.append({'Home': out_rel.as_posix()})
        elif len(rel.parts) == 1: api.append(entry)
        else: sub.setdefault(rel.parts[0], []).append(entry)
    nav = home + ([{'API reference': api}] if api else [])
    order = list(SECTIONS) + sorted(k for k in sub if k not in SECTIONS)
    for k in order:
        if k in sub: nav.append({SECTIONS.get(k, re.sub(r'^\d+_', '', k).replace('_', ' ').title()): sub[k]})
    return nav


# ---------------------------------------------------------------- 4. MkDocs
def build(execute=False, n_workers=None):
    os.chdir(ROOT)
    from nbdev.config import get_config
    cfg = get_config()
    nbs = cfg.nbs_path
    rels = list_notebooks(nbs)
    if not rels: raise SystemExit(f'docs: no notebooks in {nbs}')
    n_workers = n_workers or min(4, os.cpu_count() or 1)
    tmp = None
    try:
        if execute:
            # no part of this path may start with '.' or be `_proc`/`_docs`: proc_nbs would skip it
            tmp = Path(tempfile.mkdtemp(prefix='rtl_docs_exec_', dir='/tmp' if os.path.isdir('/tmp') else None))
            execute_notebooks(nbs, rels, tmp/'nbs')
            proc = process(tmp/'nbs', n_workers, 'executed')
        else: proc = process(nbs, n_workers, 'stored')
    finally:
        if tmp: shutil.rmtree(tmp, ignore_errors=True)
    md_dir = proc/'mkdocs_md'
    shutil.rmtree(md_dir, ignore_errors=True); md_dir.mkdir(parents=True)
    doc_url = (cfg.get('doc_host', '') + cfg.get('doc_baseurl', '')) if cfg.get('doc_host') else ''
    pages = to_markdown(proc, rels, md_dir, doc_url)
    dropped = fix_links(md_dir, pages)
    if dropped: _say(f'{len(dropped)} links to anchors without a heading lost the anchor, e.g. {dropped[0][1]} in {dropped[0][0]}')
    copy_assets(nbs, md_dir)
    shutil.copy2(SCRIPTS/'docs_extra.css', md_dir/'docs_extra.css')
    site = ROOT/'_site'
    conf = {'INHERIT': os.path.relpath(SCRIPTS/'docs_mkdocs.yml', proc),
            'site_name': cfg.get('title', cfg.lib_name), 'site_description': cfg.get('description', ''),
            'docs_dir': md_dir.name, 'site_dir': os.path.relpath(site, proc), 'nav': make_nav(pages)}
    (proc/'mkdocs.yml').write_text(yaml.safe_dump(conf, sort_keys=False, allow_unicode=True))
    t0 = time.time()
    env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1'}
    subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--clean', '-q', '-f', str(proc/'mkdocs.yml')], check=True, env=env)
    _say(f'MkDocs built {len(pages)} pages into {site.relative_to(ROOT)}/ in {time.time()-t0:.1f}s')
    return site


def serve(site, port):
    import functools, http.server
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with http.server.ThreadingHTTPServer(('127.0.0.1', port), handler) as httpd:
        _say(f'serving {site} at http://127.0.0.1:{httpd.server_address[1]}/ (Ctrl-C stops)')
        try: httpd.serve_forever()
        except KeyboardInterrupt: pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--execute', action='store_true', help='execute the notebooks first (fresh outputs) instead of using their stored outputs')
    p.add_argument('--serve', action='store_true', help='after building, serve _site/ on 127.0.0.1')
    p.add_argument('--port', type=int, default=8000, help='port for --serve (default 8000; 0 picks a free one)')
    p.add_argument('--n-workers', type=int, default=None, help="processes for nbdev's processing (default: up to 4)")
    a = p.parse_args(argv)
    site = build(execute=a.execute, n_workers=a.n_workers)
    if a.serve: serve(site, a.port)


if __name__ == '__main__': main()
