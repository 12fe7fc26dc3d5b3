from cio_outbox.cli import main

main()
