#!/usr/bin/env bash
# The MT25 study's remaining runs (bench/mt25_study/queue.txt), two at a time, each from a worktree of this
# repository pinned at the commit its line names, so that edits never leak into running jobs:
#
#     bash bench/mt25_study/lanes.sh RUNS_DIR [LANES]     # e.g. bash bench/mt25_study/lanes.sh /work/study-runs
#
# Each job runs under GNU time (RUNS_DIR/q/NAME.time.<epoch>, its output in RUNS_DIR/q/NAME.log) and is
# marked done (q/NAME.done) when it exits 0; a lane stops at the first failure. Killed, it resumes: run the
# same command again (every cpd run, and ewc_grid.py, resumes where it stopped). The worktrees live in
# RUNS_DIR/trees/<commit>, with the compiled extension copied from this checkout (built in place instead
# where the commit's C++ sources differ).
set -eu
runs=$(realpath "$1"); lanes=${2:-2}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
queue=${QUEUE:-$repo/bench/mt25_study/queue.txt}  # QUEUE=FILE: another list
mkdir -p "$runs/q" "$runs/trees"
rm -f "$runs"/q/*.taken  # a lane killed with its session left its job taken: free it

tree() {  # the worktree of commit $1
  local t=$runs/trees/$1
  if [ ! -d "$t" ]; then
    git -C "$repo" worktree add --quiet --detach "$t" "$1"
    if git -C "$repo" diff --quiet "$1" HEAD -- csrc setup.py; then
      cp "$repo"/cpd_fast/_C*.so "$t/cpd_fast/"
    else
      (cd "$t" && python setup.py build_ext --inplace >/dev/null)
    fi
  fi
  echo "$t"
}

lane() {
  while true; do
    local job="" name commit cmd
    exec 9>"$runs/q/.lock"; flock 9
    while IFS='|' read -r name commit cmd; do
      [[ -z "$name" || "$name" == \#* ]] && continue
      [[ -e $runs/q/$name.done || -e $runs/q/$name.taken ]] && continue
      echo "lane $1 $(date +%s)" > "$runs/q/$name.taken"; job="$name|$commit|$cmd"; break
    done < "$queue"
    local t=""
    [[ -n "$job" ]] && t=$(tree "$commit")  # under the lock: one lane makes a worktree, the other waits
    flock -u 9; exec 9>&-
    [[ -z "$job" ]] && { echo "lane $1: queue empty"; return 0; }
    IFS='|' read -r name commit cmd <<< "$job"
    cmd=${cmd//\{tree\}/$t}; cmd=${cmd//\{runs\}/$runs}
    echo "lane $1: $name ($(date))"
    local rc=0
    (cd "$runs" && PYTHONPATH=$t /usr/bin/time -v -o "q/$name.time.$(date +%s)" bash -c "$cmd" >> "q/$name.log" 2>&1) || rc=$?
    rm -f "$runs/q/$name.taken"
    [[ $rc == 0 ]] || { echo "lane $1: $name failed (rc $rc): $runs/q/$name.log"; return 1; }
    date > "$runs/q/$name.done"
  done
}

for i in $(seq "$lanes"); do lane "$i" & sleep 2; done
wait
