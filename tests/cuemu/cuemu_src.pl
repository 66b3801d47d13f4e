#!/usr/bin/perl
# Rewrites a .cu file into C++ that cuemu.h compiles, keeping every line
# where it was (so compiler messages point at the .cu file):
#   name<T, 2><<<grid, block, smem, stream>>>(args)
#     -> cuemu_launch("name<T, 2>", cuemu_config(grid, block, smem, stream),
#                     [](auto &...a) { name<T, 2>(a...); }, args)
#   cudaFuncSetAttribute(name<T>, ...) -> cuemu_func_set_attribute("name<T>", ...)
#   extern __shared__ __align__(16) T name[];
#     -> T *name = (T *)cuemu_dynamic_smem();
use strict;
use warnings;

local $/;
my $src = <STDIN>;
my $file = $ARGV[0] // "stdin";

# A kernel name, with template arguments nested one level deep at most.
my $name = qr/[A-Za-z_]\w*(?:\s*<(?:[^<>;]|<[^<>;]*>)*>)?/;
$src =~ s{($name)\s*<<<(.*?)>>>\s*\(\s*(\)?)}{
    my ($k, $cfg, $close) = ($1, $2, $3);
    (my $label = $k) =~ s/\s+/ /g;
    "cuemu_launch(\"$label\", cuemu_config($cfg), [](auto &...a) { $k(a...); }" . ($close ? ")" : ", ")
}gse;
$src =~ s{cudaFuncSetAttribute\s*\(\s*($name)\s*,}{
    (my $label = $1) =~ s/\s+/ /g;
    "cuemu_func_set_attribute(\"$label\","
}gse;
$src =~ s{extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w ]*?)\s+(\w+)\s*\[\s*\]\s*;}
         {$1 *$2 = ($1 *)cuemu_dynamic_smem();}g;
die "cuemu_src.pl: $file: a launch was not rewritten\n" if $src =~ /<<</;
print "#line 1 \"$file\"\n", $src;
