#!/usr/bin/env bash
# A scripted conversation: three questions about an image, asked in turn in one conversation by
# `mvlm-compile chat` (each answered after the turns before it), the answers written to a file,
# then printed beside their questions.
#
#   examples/06_scripted_chat/chat.sh BUNDLE IMAGE WORKDIR
#
# chat reads one line at a time from stdin; since stdin is not a terminal here, the first line it
# cannot take (an /image file that is missing, a conversation longer than the context) ends it with
# status 2, and so this script. stdout holds the answers alone (the banner goes to stderr).
set -euo pipefail

bundle=${1:?usage: chat.sh BUNDLE IMAGE WORKDIR}
image=${2:?usage: chat.sh BUNDLE IMAGE WORKDIR}
workdir=${3:?usage: chat.sh BUNDLE IMAGE WORKDIR}
mkdir -p "$workdir"

cat > "$workdir/questions.txt" <<'QUESTIONS'
Describe the image in one sentence.
How many shapes are there?
What shape is on the left?
QUESTIONS

mvlm-compile chat "$bundle" --image "$image" --max-new-tokens 64 \
  < "$workdir/questions.txt" > "$workdir/answers.txt"

while IFS= read -r question <&3 && IFS= read -r answer <&4; do
  printf '%s -> %s\n' "$question" "$answer"
done 3< "$workdir/questions.txt" 4< "$workdir/answers.txt"
