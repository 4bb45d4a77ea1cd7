#!/usr/bin/env bash
# Installs the Debian packages that hold the demo's real images (offline sources):
# openclipart-png (clip art in category folders), fonts-noto-color-emoji + unicode-data (emoji
# rendered with Pillow, captions from their names), dataset-fashion-mnist (held-out probe set);
# for the RICE scenes fonts-noto-core (words rendered in Noto Sans/Serif) and tesseract-ocr +
# tesseract-ocr-eng (stage 1b's OCR, regions.ocr=tesseract); and shellcheck, which the tests run
# over launch/*.sh.
set -euo pipefail
need=()
[ -d /usr/share/openclipart ] || need+=(openclipart-png)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || [ -f /usr/share/unicode/UnicodeData.txt ] || need+=(unicode-data)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/fonts/truetype/noto/NotoSans-Regular.ttf ] || need+=(fonts-noto-core)
command -v tesseract >/dev/null || need+=(tesseract-ocr)
ls /usr/share/tesseract-ocr/*/tessdata/eng.traineddata >/dev/null 2>&1 || need+=(tesseract-ocr-eng)
command -v shellcheck >/dev/null || need+=(shellcheck)   # the launch scripts' lint test
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v apt-get >/dev/null; then
  echo "missing demo data packages: ${need[*]}; install them with: apt-get install ${need[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
