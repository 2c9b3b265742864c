# Sourced by the setup, sanitizer and fuzzing scripts: Debian packages installed only when missing.
#   have_pkg NAME                   true when the package is installed
#   install_pkgs WHO NAME...        installs the packages given (none: nothing), saying so as WHO
#   install_missing WHO NAME...     installs those of the packages not installed yet
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
install_pkgs() {
  local who=$1
  shift
  [ $# -gt 0 ] || return 0
  echo "$who: installing $*"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}
install_missing() {
  local who=$1 p
  shift
  local need=()
  for p in "$@"; do have_pkg "$p" || need+=("$p"); done
  install_pkgs "$who" ${need[@]+"${need[@]}"}
}
