#!/usr/bin/perl
# Rewrites a .cu file into C++ that cuemu.h compiles, keeping every line
# where it was (so compiler messages point at the .cu file):
#   name<T, 2><<<grid, block, smem, stream>>>(args)
#     -> cuemu_launch("name<T, 2>", cuemu_config(grid, block, smem, stream),
#                     [](auto &...a) { name<T, 2>(a...); }, args)
#   cudaFuncSetAttribute(name<T>, ...) -> cuemu_func_set_attribute("name<T>", ...)
#   extern __shared__ __align__(16) T name[];
#     -> T *name = (T *)cuemu_dynamic_smem();
#   __shared__ __align__(16) T a[2][N], b;
#     -> static char cuemu_key_a; T (&a)[2][N] = *(T (*)[2][N])cuemu_static_smem(&cuemu_key_a, sizeof(T[2][N]), 16);
#        static char cuemu_key_b; T &b = *(T *)cuemu_static_smem(&cuemu_key_b, sizeof(T), 16);
#     (the block's shared memory, dynamic and static, is one arena that
#     every block starts NaN-filled: see cuemu.cc)
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
$src =~ s{__shared__\s+(?:__align__\s*\(\s*(\d+)\s*\)\s+)?((?:(?:unsigned|signed|const)\s+)*[A-Za-z_][\w:]*)\s+([^;]+);}{
    my ($align, $type, $decls) = ($1 // 16, $2, $3);
    my $out = "";
    while ($decls =~ /\G\s*(\w+)((?:\s*\[[^\[\]]*\])*)\s*(?:,|$)/gc) {
        my ($v, $dims) = ($1, $2);
        my $ref = $dims eq "" ? "$type &$v = *($type *)" : "$type (&$v)$dims = *($type (*)$dims)";
        $out .= "static char cuemu_key_$v; ${ref}cuemu_static_smem(&cuemu_key_$v, sizeof($type$dims), $align); ";
    }
    die "cuemu_src.pl: $file: a __shared__ declaration was not understood: $decls\n" if (pos($decls) // 0) != length $decls;
    $out
}ge;
die "cuemu_src.pl: $file: a launch was not rewritten\n" if $src =~ /<<</;
(my $code = $src) =~ s{//[^\n]*|/\*.*?\*/}{}gs;
die "cuemu_src.pl: $file: a __shared__ declaration was not rewritten\n" if $code =~ /__shared__/;
print "#line 1 \"$file\"\n", $src;
