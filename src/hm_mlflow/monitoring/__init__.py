"""The loop that watches the model in service (CD4ML's feedback half).

    answer (webapp, batch)  ->  recorder: the prediction log (SQLite or PostgreSQL) and the
                                film kept for labelling (a folder or the data bucket)
    reader's label          ->  POST /api/feedback (a reviewer's token)  ->  labels
    log + labels + the version's reference  ->  report: live metrics per site and version,
                                drift per site, the challenger beside the champion
    hm-mlflow monitor       ->  the report as MLflow metrics of one run per version; with
                                --retrain-on-drift, a training when a site drifts
    hm-mlflow train         ->  the labelled films join the training set, each site's held-out
                                films join the gate and the operating point

Modules: `store` (the database), `films` (kept films), `recorder` (off the request path),
`reviewers` (tokens), `reference` (what a version saw in training), `drift`, `intervals`,
`report`, `feedback` (films for training), `monitor` (the scheduled job).
"""
