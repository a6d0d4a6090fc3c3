"""The parts of benchmarks/msrc_study.py: the semi-supervised study on real photographs (MSRC-21).

    settings.py   what the study is: its methods (VARIANTS), the settings table, the focus classes
    runner.py     the run folders and their phases: 1/8 for every method, 1/4 for supervised, CPS + CutMix and
                  the two methods best on the validation images at 1/8 (the only thing val selects)
    report.py     numbers from the finished runs (ssl_study_parts' aggregate), labeled images per class
    markdown.py   results.md and summary.md (the README's lead section, between its own markers)
    figures.py    miou_by_method.png and predictions.png (test images, Figure-6 style)

It reuses benchmarks/ssl_study_parts (the generated-scenes study) for what both studies do alike: the run
record and resuming, the trainer processes, scores, paired differences and cost from the logs, table rows and
generated findings. What differs lives here: real data in a folder dataset, a score on the test split, the
two-phase plan and the report's text.
"""
