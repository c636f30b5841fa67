#!/usr/bin/env bash
# bench/plot.sh DIR [FLOOR_FAULT_US] — the PNGs of `scripts/bench --plot DIR`, drawn with
# gnuplot from the files lazymig-bench wrote to DIR/data (bench/plot.hpp):
#   DIR/fault-latency-cdf.png  lazymig's demand-fault latency CDF of every run with
#                              faults, the machine's raw fault floor as a vertical line
#   DIR/pages-present.png      percent of guest pages present over time, every run
#   DIR/push-throughput.png    guest pages becoming present (MB/s) over time
# Exits non-zero, naming what is missing, when there is nothing to draw.
set -euo pipefail
dir=$1 floor=${2:-}
data=$dir/data
command -v gnuplot >/dev/null || { echo "plot: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 1; }
shopt -s nullglob
timelines=("$data"/timeline-*.tsv)
faults=("$data"/faults-*.tsv)
[ ${#timelines[@]} -gt 0 ] || { echo "plot: no timeline-*.tsv in $data" >&2; exit 1; }

# name FILE: the run's label and its process id, which orders the runs as bench.txt
# lists them ("256m-memfd-1touchers pid 1260").
name() { local b; b=$(basename "$1" .tsv); b=${b#*-}; echo "${b%-*} pid ${b##*-}"; }
# plot_list COLUMNS FILE...: gnuplot's plot clauses, one per file.
plot_list() {
    local cols=$1 sep='' f; shift
    for f in "$@"; do
        printf "%s'%s' using %s with lines lw 2 title '%s'" "$sep" "$f" "$cols" "$(name "$f")"
        sep=', '
    done
}

common="set terminal pngcairo size 960,560 font 'sans,11'; set grid; set key bottom right;"
gnuplot -e "$common set output '$dir/pages-present.png';
  set title 'Guest pages present at the destination (lazymig-bench)';
  set xlabel 'ms since the destination resumed the VM'; set ylabel '% of pages present'; set yrange [0:105];
  plot $(plot_list '1:(100.0*$2/$3)' "${timelines[@]}")"
gnuplot -e "$common set output '$dir/push-throughput.png'; set key top right;
  set title 'Guest memory placed at the destination, MB/s over 50 ms (lazymig-bench)';
  set xlabel 'ms since the destination resumed the VM'; set ylabel 'MB/s'; set yrange [0:*];
  plot $(plot_list '1:5' "${timelines[@]}")"
if [ ${#faults[@]} -gt 0 ]; then
    floor_line=''
    [ -n "$floor" ] && floor_line="set arrow from $floor, graph 0 to $floor, graph 1 nohead dt 2 lw 2 lc rgb 'black';
      set label 'floor: raw peer-served fault $floor us' at $floor, graph 0.05 offset 0.5,0;"
    gnuplot -e "$common set output '$dir/fault-latency-cdf.png'; set logscale x;
      set title 'Demand faults as the guest sees them: latency CDF of faulting touches (lazymig-bench)';
      set xlabel 'latency (us, log scale)'; set ylabel 'fraction of faults'; set yrange [0:1.02];
      $floor_line
      plot $(plot_list '1:2' "${faults[@]}")"
fi
ls "$dir"/*.png
