"""A zoo in which tasks a task-free student cannot tell apart share one behaviour: their group's best
teacher (from ``bench/task_free/ceiling.json``) acts for every task of the group.

    python bench/task_free/group_zoo.py --ceiling bench/task_free --out ZOO_DIR
    cpd run --preset mt25-plus --set zoo=ZOO_DIR --seed 0 --out RUN     # distil from it

The zoo is a copy of the shipped ``mt25`` zoo; each grouped task whose best behaviour is another task's
teacher gets a record with ``acts_as`` (:func:`cpd_fast.teachers.zoo.add_behaviour`), its official success
measured on the task. The yardstick of a run from it must stay the shipped zoo's own teachers (a behaviour
that does worse than a task's own teacher on it costs the student): ``ceiling.py --runs`` sets the runs'
per-task success beside the shipped teachers'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
from ceiling import ceiling, cross_matrix, groups

from cpd_fast.teachers.zoo import add_behaviour, zoo_dir, zoo_records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ceiling", required=True, help="the directory holding ceiling.json")
    ap.add_argument("--out", required=True, help="the new zoo's directory")
    ap.add_argument("--zoo", default="mt25", help="the zoo to copy")
    args = ap.parse_args(argv)
    with open(os.path.join(args.ceiling, "ceiling.json")) as f:
        rec = json.load(f)
    tasks = rec["tasks"]
    own = {t: r.success_rate for t, r in zoo_records(args.zoo)[1].items()}
    X = cross_matrix(rec, own)
    _, chosen = ceiling(X, groups(np.asarray(rec["overlap"]), rec["group_at"]))
    if not os.path.exists(os.path.join(args.out, "teachers.json")):
        shutil.copytree(zoo_dir(args.zoo), args.out, dirs_exist_ok=True)
    for c in chosen:
        acting = tasks[c["behaviour"]]
        for i in c["tasks"]:
            if tasks[i] == acting:
                continue
            group = [tasks[k] for k in c["tasks"]]
            why = (f"ambiguity group {group} (bench/task_free/ceiling.json): {acting}'s teacher scored "
                   f"{X[c['behaviour'], i]:.2f} on {tasks[i]}")  # fmt: skip
            r = add_behaviour(args.out, tasks[i], acting, why=why)
            print(f"{tasks[i]}: acts as {acting}, official success {r.success_rate:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
