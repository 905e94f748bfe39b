#!/usr/bin/env bash
# The CLI's help, version, exit codes and configuration error messages.
set -u
exe=${HILAL_EXE:?run through ctest}
src=${HILAL_SOURCE_DIR:?}
tmp=${HILAL_TMPDIR:?}
rm -rf "$tmp" && mkdir -p "$tmp"
export HOME="$tmp" XDG_CONFIG_HOME="$tmp/xdg"
unset HILAL_CONFIG
pass=0 fail=0
check() { # check NAME CONDITION-EXIT-STATUS
  if [ "$2" -eq 0 ]; then pass=$((pass+1)); else fail=$((fail+1)); echo "FAIL: $1"; fi
}
run() { out=$("$exe" "$@" 2>&1); rc=$?; }

run --help;            check "--help exits 0" $rc; echo "$out" | grep -q "Exit codes:"; check "--help lists exit codes" $?
echo "$out" | grep -q "  config "; check "--help lists commands" $?
run --version;         check "--version exits 0" $rc; echo "$out" | grep -Eq "^hilal [0-9]+\.[0-9]+\.[0-9]+"; check "version line" $?
echo "$out" | grep -q "CFITSIO" && echo "$out" | grep -q "HDF5" && echo "$out" | grep -q "wcslib"; check "library versions" $?
run;                   [ $rc -eq 2 ]; check "no command -> 2" $?
run frobnicate;        [ $rc -eq 2 ]; check "unknown command -> 2 (got $rc)" $?
echo "$out" | grep -q "unknown command 'frobnicate'"; check "unknown command message" $?
run --bogus config;    [ $rc -eq 2 ]; check "unknown option -> 2" $?

# Configuration: values, origins, precedence.
run config;            check "config exits 0" $rc
echo "$out" | grep -q "edge_margin = 8    # from default"; check "default origin shown" $?
cat > "$tmp/a.conf" <<'CONF'
[pipeline]
edge_margin = 12
CONF
cat > "$tmp/b.conf" <<'CONF'
[pipeline]
edge_margin = 20   # later file wins
CONF
run --config "$tmp/a.conf" --config "$tmp/b.conf" config --key pipeline.edge_margin
echo "$out" | grep -q "pipeline.edge_margin = 20    # from $tmp/b.conf:2"; check "later --config wins: $out" $?
run --config "$tmp/a.conf" config --set pipeline.edge_margin=30 --key pipeline.edge_margin
echo "$out" | grep -q "pipeline.edge_margin = 30    # from --set"; check "--set wins: $out" $?
mkdir -p "$tmp/xdg/hilal" && printf '[pipeline]\nworkers = 3\n' > "$tmp/xdg/hilal/hilal.conf"
run config --key pipeline.workers
echo "$out" | grep -q "from $tmp/xdg/hilal/hilal.conf:2"; check "user config file read: $out" $?
run --config "$tmp/a.conf" config --key pipeline.workers
echo "$out" | grep -q "= 3 "; check "--config keeps user file values it does not set: $out" $?
rm -rf "$tmp/xdg"

# Configuration errors: exit 3, file and line, nearest key.
printf '[pipeline]\nedge_margn = 3\n' > "$tmp/typo.conf"
run --config "$tmp/typo.conf" config; [ $rc -eq 3 ]; check "unknown key -> 3 (got $rc)" $?
echo "$out" | grep -q "typo.conf:2: unknown key 'pipeline.edge_margn'; did you mean 'pipeline.edge_margin'?"; check "unknown key message: $out" $?
run --set pipeline.edge_margin=-4 config; [ $rc -eq 3 ]; check "out of range -> 3" $?
echo "$out" | grep -q "pipeline.edge_margin = -4 is out of range \[0, 512\] px"; check "range message: $out" $?
HILAL_CONFIG="$tmp/missing.conf" "$exe" config >/dev/null 2>&1; [ $? -eq 3 ]; check "missing \$HILAL_CONFIG -> 3" $?

# The shipped commented defaults are exactly the built-in defaults.
run config --no-origin
diff <(echo "$out") "$src/configs/hilal.conf" > "$tmp/conf.diff"; check "configs/hilal.conf is up to date (regenerate with: hilal config --no-origin > configs/hilal.conf); diff in $tmp/conf.diff" $?
run --config "$src/configs/hilal.conf" config --plain; check "configs/hilal.conf loads" $rc

# Every command has --help.
for c in $("$exe" --help | awk '/^Commands:/{on=1;next} /^$/{on=0} on{print $1}'); do
  "$exe" "$c" --help > "$tmp/help.txt" 2>&1; check "$c --help exits 0" $?
  grep -q "Usage: hilal" "$tmp/help.txt"; check "$c --help prints usage" $?
done

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
