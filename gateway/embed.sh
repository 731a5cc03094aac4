#!/bin/sh
# Write a C file that contains the bytes of INPUT as the array NAME and its length as
# NAME_len, so that the playground page is edited as one HTML file and served from
# the binary.
#
#   embed.sh INPUT NAME > OUTPUT.c
set -eu
if [ $# -ne 2 ]; then
    echo "usage: embed.sh INPUT NAME > OUTPUT.c" >&2
    exit 2
fi
in=$1
name=$2
echo "/* Generated from $(basename "$in") by gateway/embed.sh: edit that file instead. */"
echo "#include <stddef.h>"
echo "const unsigned char ${name}[] = {"
od -An -v -tx1 "$in" | sed -e 's/[0-9a-f][0-9a-f]/0x&,/g' -e 's/^ *//'
# A trailing NUL, not counted in the length, keeps the array non-empty for an empty file.
echo "0x00};"
echo "const size_t ${name}_len = sizeof ${name} - 1;"
