# Shared by the bench scripts (sourced).
# median N...: the median of the numbers given.
median() { python3 -c "import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
