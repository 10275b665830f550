/* Text and number helpers of the stamp guest (included by stamp.S). */

/* match_prefix: rsi = cursor, rdi = NUL-terminated prefix.
 * On match: eax = 1, rsi advanced past prefix.  Else eax = 0, rsi unchanged.
 * Clobbers rax, rdx, rdi. */
match_prefix:
        mov     rdx, rsi
1:      movzx   eax, byte ptr [rdi]
        test    al, al
        jz      2f
        cmp     al, [rdx]
        jne     3f
        inc     rdi
        inc     rdx
        jmp     1b
2:      mov     rsi, rdx
        mov     eax, 1
        ret
3:      xor     eax, eax
        ret

/* parse_dec: rsi = cursor.  Returns rax = value, rdx = digit count, rsi
 * advanced past the digits.  Clobbers rax, rdx, r10. */
parse_dec:
        xor     eax, eax
        xor     edx, edx
1:      movzx   r10d, byte ptr [rsi]
        sub     r10d, '0'
        cmp     r10d, 9
        ja      2f
        imul    rax, rax, 10
        add     rax, r10
        inc     rdx
        inc     rsi
        jmp     1b
2:      ret

/* parse_hex: rsi = cursor.  Hex digits (0-9, a-f, A-F; no "0x").  Returns
 * rax = value, rdx = digit count, rsi advanced.  Clobbers rax, rdx, r10. */
parse_hex:
        xor     eax, eax
        xor     edx, edx
1:      movzx   r10d, byte ptr [rsi]
        sub     r10d, '0'
        cmp     r10d, 9
        jbe     2f
        or      r10d, 0x20              /* 'A'-'0' | 0x20 = 'a'-'0' */
        sub     r10d, 'a' - '0'
        cmp     r10d, 5
        ja      3f
        add     r10d, 10
2:      shl     rax, 4
        add     rax, r10
        inc     rdx
        inc     rsi
        jmp     1b
3:      ret

/* putc: dil = byte.  Polls LSR.THRE before writing.  Preserves all. */
putc:
        push    rax
        push    rdx
1:      mov     dx, COM1_LSR
        in      al, dx
        test    al, LSR_THRE
        jz      1b
        mov     dx, COM1
        mov     eax, edi
        out     dx, al
        pop     rdx
        pop     rax
        ret

/* puts: rsi = NUL-terminated string.  Clobbers rsi, rdi. */
puts:
1:      movzx   edi, byte ptr [rsi]
        test    edi, edi
        jz      2f
        call    putc
        inc     rsi
        jmp     1b
2:      ret

newline:
        push    rdi
        mov     edi, '\n'
        call    putc
        pop     rdi
        ret

/* print_dec: rax = unsigned value.  Clobbers rax, rcx, rdx, rdi, rsi. */
print_dec:
        sub     rsp, 32
        lea     rsi, [rsp + 31]
        mov     byte ptr [rsi], 0
        mov     ecx, 10
1:      xor     edx, edx
        div     rcx
        add     edx, '0'
        dec     rsi
        mov     [rsi], dl
        test    rax, rax
        jnz     1b
        call    puts
        add     rsp, 32
        ret

/* print_hex: rax = value, lowercase, no leading zeros ("0" for zero).
 * Clobbers rax, rcx, rdx, rdi. */
print_hex:
        mov     rdx, rax
        mov     ecx, 60                 /* shift of the current nibble */
1:      test    ecx, ecx                /* skip leading zero nibbles */
        jz      2f
        mov     rax, rdx
        shr     rax, cl
        and     eax, 0xf
        jnz     2f
        sub     ecx, 4
        jmp     1b
2:      mov     rax, rdx
        shr     rax, cl
        and     eax, 0xf
        lea     rdi, [hex_digits]
        movzx   edi, byte ptr [rdi + rax]
        call    putc
        sub     ecx, 4
        jns     2b
        ret
