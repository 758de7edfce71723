# Sourced by the scripts: one way to make a virtual environment with a given dbt-core minor.
#
# dbt_venv VENV MINOR [requirement...]
#   Creates VENV (if missing) and installs dbt-core MINOR.x with dbt-duckdb and dbt-postgres of
#   the same minor (1.8-1.11; for 1.12 the newest adapters, which support it) plus the given
#   requirements, with uv (installed with pip when missing; it resolves in seconds).
#   dbt-core 1.12 depends on dbt-core-experimental-parser, whose only version with a binary wheel
#   on the registry is 2.0.0a4 (the others download a binary while they build, which these
#   machines cannot): an override pins it. Users install dbt 1.12 the ordinary way.
dbt_adapter_pin() {
  case "$1" in
    1.8|1.9|1.10|1.11) echo "~=$1.0" ;;
    *) echo ">=1.8" ;;
  esac
}

dbt_venv() {
  local venv="$1" minor="$2"; shift 2
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if ! python3 -m uv --version >/dev/null 2>&1; then
    python3 -m pip install -q --disable-pip-version-check uv
  fi
  local override pin
  override="$(mktemp)"
  echo "dbt-core-experimental-parser==2.0.0a4" >"$override"
  pin="$(dbt_adapter_pin "$minor")"
  python3 -m uv pip install -q --python "$venv/bin/python" --override "$override" \
    "dbt-core~=$minor.0" "dbt-duckdb$pin" "dbt-postgres$pin" "$@"
  rm -f "$override"
}
