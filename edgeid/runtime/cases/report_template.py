# ruff: noqa: E501 (HTML template lines)
"""The case report's HTML, a Jinja2 template rendered with autoescape (``report.py``): every
file name, reason and subject name in it is escaped by the engine, not by hand."""

REPORT_TEMPLATE = """{% macro files_table(files) %}
<table><thead><tr><th>File</th><th>SHA-256</th><th>Type</th><th>Status</th><th>Faces</th><th>Reason</th></tr></thead><tbody>
{% for f in files %}
<tr><td>{{ f.names|join(', ') }}</td><td><span class="mono">{{ f.sha256 or '–' }}</span></td><td>{{ f.media }}{% if f.media == 'video' %}, {{ f.frames }} frames{% endif %}</td><td>{{ f.status }}</td><td>{{ f.faces }}</td><td>{{ f.reason or '' }}</td></tr>
{% endfor %}
</tbody></table>
{% endmacro %}
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Case {{ meta.number }}: faces and leads</title>
<style>{{ style }}</style></head><body>
<h1>Case {{ meta.number }}: faces and leads</h1>
<p class="muted">Generated {{ generated_at|time }} by edgeid on this box. Embedding model
{{ meta.model_id }}. Case created {{ meta.created_at|time }} by {{ meta.created_by }};
retention until {{ meta.retention_until.isoformat() if meta.retention_until else "not set" }}.
</p>
<p class="notice"><b>Leads, not identifications.</b> Every candidate below is an
investigative lead for a trained person to confirm against the source material. A score above
the threshold is not proof of identity; a missing candidate proves nothing. Clusters group
faces the model finds alike: check them before relying on them.</p>
<h2>Summary</h2>
<table><thead><tr><th>Files</th><th>Failed</th><th>Partial</th><th>Faces</th><th>Clusters</th></tr></thead>
<tbody><tr><td>{{ view.files|length }}</td><td>{{ view.failed|length }}</td><td>{{ view.partial|length }}</td><td>{{ view.faces }}</td><td>{{ view.clusters|length }}</td></tr></tbody></table>
<p>Clustering: {{ method }}</p>
{% if stale %}<p class="notice">Faces were added after these clusters were computed: run the ingest again to update them.</p>{% endif %}
<h2>Ingest runs</h2>
<table><thead><tr><th>Run</th><th>Started</th><th>Finished</th><th>Status</th><th>User</th><th>Reason</th><th>Source</th><th>Frames every</th><th>Galleries</th><th>May include children</th></tr></thead>
<tbody>
{% for r in meta.runs %}
<tr><td>{{ r.number }}</td><td>{{ r.started_at|time }}</td><td>{{ r.finished_at|time }}</td><td>{{ r.status }}{% if r.note %} ({{ r.note }}){% endif %}</td><td>{{ r.user }}</td><td>{{ r.reason }}</td><td>{{ r.source }}</td><td>{{ '%g'|format(r.frame_interval_s) }} s</td><td>{{ r.galleries|join(', ') or 'none' }}</td><td>{{ children[r.children] }}</td></tr>
{% endfor %}
</tbody></table>
<h2>Clusters</h2>
{% for row in clusters %}
{% set c = row.cluster %}
<section class="cluster" id="cluster-{{ c.number }}">
<h3>Cluster {{ c.number }}: {{ c.faces|length }} face(s) in {{ c.appearances|length }} file(s)</h3>
{% if row.faces %}
<div class="faces">
{% for face, uri in row.faces %}<figure><img alt="face" src="{{ uri }}"><figcaption>quality {{ '%.2f'|format(face.quality) }}{% if face.time_s is not none %} at {{ face.time_s|seconds }}{% endif %}</figcaption></figure>{% endfor %}
</div>
{% if c.below_gate %}<p class="muted">{{ c.below_gate }} more face(s) are below the quality gate ({{ '%.2f'|format(min_quality) }}) and not shown as this cluster's best.</p>{% endif %}
{% elif row.clearest %}
<p class="muted">No face of this cluster passes the quality gate ({{ '%.2f'|format(min_quality) }}); its clearest face, for reference only:</p>
<div class="faces"><figure><img alt="face" src="{{ row.clearest[1] }}"><figcaption>quality {{ '%.2f'|format(row.clearest[0].quality) }}</figcaption></figure></div>
{% endif %}
<table><thead><tr><th>File</th><th>Faces</th><th>Video times (m:s)</th></tr></thead><tbody>
{% for a in c.appearances %}
<tr><td>{{ a.file.names|join(', ') }}</td><td>{{ a.faces }}</td><td>{% for t in a.times_s %}{{ t|seconds }}{% if not loop.last %}, {% endif %}{% else %}–{% endfor %}</td></tr>
{% endfor %}
</tbody></table>
{% set s = row.search %}
{% if s is none %}
<p class="muted">Not searched (no gallery to search).</p>
{% elif s.error %}
<p class="muted">Search failed: {{ s.error }}</p>
{% else %}
<p><b>{% if s.matches %}{{ s.matches|length }} candidate(s) above the threshold{% else %}No match: no candidate above the threshold{% endif %}</b> (galleries: {{ s.galleries|join(', ') }}; age band {{ s.age_band }}; searched {{ s.searched_at|time }}).</p>
<p class="muted">{{ row.note }}</p>
{% if row.leads %}
<table><thead><tr><th>Rank</th><th>Case face and enrolled photo</th><th>Gallery</th><th>Subject</th><th>Score</th><th>Band</th><th>Above</th></tr></thead><tbody>
{% for item in row.leads %}
{% set lead = item.lead %}
<tr class="{{ 'above' if lead.above_threshold else 'below' }}"><td>{{ lead.rank }}</td>
<td><div class="pair"><figure><img alt="case face" src="{{ item.probe }}"><figcaption>case face</figcaption></figure>
{% if item.enrolled %}<figure><img alt="enrolled photo" src="{{ item.enrolled }}"><figcaption>enrolled photo</figcaption></figure>{% else %}<figure><div class="gone">enrolled photo not available</div></figure>{% endif %}</div></td>
<td>{{ lead.gallery }}</td><td>{{ lead.display_name }}<br><span class="mono">{{ lead.subject_id }}</span></td>
<td><span class="{{ 'above' if lead.above_threshold else '' }}">{{ '%.4f'|format(lead.score) }}</span></td><td>{{ lead.band }}</td><td>{{ 'yes' if lead.above_threshold else 'no' }}</td></tr>
{% endfor %}
</tbody></table>
{% endif %}
<p class="muted">{{ s.reliability_note }}</p>
{% endif %}
</section>
{% else %}
<p>No faces were found.</p>
{% endfor %}
<h2>Files not read, or read in part</h2>
{% if problems %}{{ files_table(problems) }}{% else %}<p>None.</p>{% endif %}
<h2>Source files</h2>
{{ files_table(view.files) }}
</body></html>
"""
